"""Names in Redis: the coordinator's keys and the Celery queues, all under one namespace
so that several runs (and the test suite) can share a Redis server."""

from __future__ import annotations

from dataclasses import dataclass

from cord.common.messages import TaskKind

TASK_NAMES: dict[TaskKind, str] = {
    "expand": "cord.expand",
    "answer": "cord.answer",
    "score": "cord.score",
}


def queue_name(namespace: str, kind: TaskKind, model: str) -> str:
    """The shared queue of a pool. Expansion and answers go to the teacher's
    ``<ns>.expand.<model>``; scoring to the meta-prover's ``<ns>.score.<model>``."""
    family = "score" if kind == "score" else "expand"
    return f"{namespace}.{family}.{model}"


def private_queue(namespace: str, kind: TaskKind, model: str, worker: str) -> str:
    """A worker's own queue beside its pool's shared one (cache-affine routing): the
    coordinator sends here the work whose prefix this worker has cached."""
    return f"{queue_name(namespace, kind, model)}.w.{worker}"


@dataclass(frozen=True)
class Keys:
    ns: str

    def patterns(self, with_bindings: bool = True) -> list[str]:
        """Every key of the namespace as SCAN patterns: the coordinator's and the
        workers' records (``<ns>:*``), the Celery queues (``<ns>.*``) and, with
        `with_bindings`, kombu's bindings of those queues."""
        found = [f"{self.ns}:*", f"{self.ns}.*"]
        return [*found, f"_kombu.binding.{self.ns}.*"] if with_bindings else found

    @property
    def problems(self) -> str:
        """HASH id -> problem JSON, written once at enqueue."""
        return f"{self.ns}:problems"

    @property
    def queue(self) -> str:
        """LIST of ids waiting for a coordinator."""
        return f"{self.ns}:queue"

    @property
    def inflight(self) -> str:
        """HASH id -> lease JSON (owner, expiry) of problems a coordinator drives."""
        return f"{self.ns}:inflight"

    @property
    def state(self) -> str:
        """HASH id -> committed search state JSON, rewritten after every step."""
        return f"{self.ns}:state"

    @property
    def done(self) -> str:
        return f"{self.ns}:done"

    @property
    def failed(self) -> str:
        return f"{self.ns}:failed"

    @property
    def finished_at(self) -> str:
        """ZSET id -> when it was marked done or failed (unix seconds), the last hour:
        the recent completion rate behind `cord-coord status`'s ETA."""
        return f"{self.ns}:finished_at"

    @property
    def workers(self) -> str:
        """HASH worker name -> heartbeat JSON."""
        return f"{self.ns}:workers"

    @property
    def running(self) -> str:
        """HASH task id -> worker name, while a worker runs the task (set before the
        engine starts, removed after the result is on the reply stream)."""
        return f"{self.ns}:running"

    def alive(self, worker: str) -> str:
        """STRING with a TTL of ``reliability.worker_lost_s``, renewed by the worker's
        heartbeat: gone means the worker is gone (no clocks compared across hosts)."""
        return f"{self.ns}:alive:{worker}"

    def replies(self, coordinator_id: str) -> str:
        """STREAM the workers append results to for one coordinator."""
        return f"{self.ns}:replies:{coordinator_id}"

    @property
    def listening_pattern(self) -> str:
        """SCAN pattern of the live coordinators' `listening` keys."""
        return listening(self.replies("*"))


def listening(reply_to: str) -> str:
    """STRING beside a coordinator's reply stream, with a TTL of its lease, renewed while
    it runs and deleted when it stops: a worker runs no task whose coordinator is gone
    (the tasks an interrupted run left queued), and `status` counts the live ones."""
    return f"{reply_to}:listening"
