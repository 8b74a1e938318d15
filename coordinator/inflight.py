"""Work in flight: every item owed a result, the tasks that carry them, and the outbox of
items not sent yet. One class owns all of it, so nothing drifts apart.

An item (`Pending`, keyed by its work key) is in exactly one of two places: the outbox
(waiting to be sent) or a `Task` (sent, not answered). It leaves when its result arrives
(`settle`), when its problem ends (`forget`) or its search stops waiting for it
(`drop`), or goes back to the outbox to be sent again (`requeue`: a retry, a hand-back,
a re-route). A task lives while it carries an item; a task answered, lost or emptied is
gone at once. So when the work drains every structure here is empty (`sizes`), however
many tasks were lost on the way.

`batches` cuts the outbox into tasks (a pool's `max_batch` each, to the queue the
router picks); `check` finds sent tasks that will never answer. The driver sends the
batches, applies the results and decides retries; it holds no task state of its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys
from cord.common.messages import AnswerItem, ExpandItem, ScoreItem, TaskKind
from cord.coordinator.routing import Router
from cord.coordinator.search import Work

CHECK_EVERY_S = 1.0  # how often `check` looks for lost tasks

Route = tuple[str, str | None]  # (queue, the worker whose own queue it is, or None)
# A router: (problem, kind, pool, items outstanding per worker) -> Route
RouteFn = Callable[[str, TaskKind, str, dict[str, int]], Route]


@dataclass
class Pending:
    """One item of work owed a result."""

    pid: str
    work: Work
    attempt: int = 1
    queued_at: float = 0.0  # when it last entered the outbox
    task: str | None = None  # the task carrying it; None while in the outbox

    @property
    def key(self) -> str:
        return self.work.item.key


@dataclass
class Task:
    """A sent task, while it carries items nobody has answered."""

    id: str
    kind: TaskKind
    model: str
    queue: str
    worker: str | None  # the worker whose own queue it went to; None: the shared queue
    sent_at: float
    keys: set[str] = field(default_factory=set)
    started_at: float | None = None  # first seen running on a worker
    vanished_at: float | None = None  # first seen neither queued nor running


@dataclass(frozen=True)
class Batch:
    """Items to send as one task."""

    kind: TaskKind
    model: str
    queue: str
    worker: str | None
    keys: list[str]
    items: list[ExpandItem | AnswerItem | ScoreItem]
    attempt: int


@dataclass(frozen=True)
class Lost:
    """A sent task that will not answer: `reason` costs its items an attempt; a task
    that waited for a worker who left before taking it is re-routed for free."""

    task: str
    keys: list[str]
    reason: str
    reroute: bool = False


class InFlight:
    def __init__(self, cfg: RunConfig, client: redis.Redis, wkeys: Keys, router: Router) -> None:
        self.cfg = cfg
        self.redis = client
        self.wkeys = wkeys  # where the workers mark running tasks and liveness
        self.router = router
        self.pending: dict[str, Pending] = {}
        self.tasks: dict[str, Task] = {}
        self._of_problem: dict[str, set[str]] = defaultdict(set)  # pid -> its pending keys
        # (kind, model) -> keys in the order they came (a dict as an ordered set)
        self._outbox: dict[tuple[TaskKind, str], dict[str, None]] = defaultdict(dict)
        self._next_check = 0.0

    # -- what is here -----------------------------------------------------------------
    def get(self, key: str) -> Pending | None:
        return self.pending.get(key)

    def sizes(self) -> dict[str, int]:
        """Entries of every structure: all 0 once the work has drained."""
        return {
            "pending": len(self.pending),
            "tasks": len(self.tasks),
            "outbox": self.waiting(),
            "outbox_pools": len(self._outbox),
            "problems": len(self._of_problem),
        }

    @property
    def empty(self) -> bool:
        return not any(self.sizes().values())

    def waiting(self) -> int:
        """Items in the outbox."""
        return sum(len(keys) for keys in self._outbox.values())

    # -- items in -----------------------------------------------------------------------
    def add(self, pid: str, works: Iterable[Work], now: float) -> None:
        """Owe results for `works`; a key already owed is not added twice."""
        for work in works:
            key = work.item.key
            if key in self.pending:
                continue
            self.pending[key] = Pending(pid, work, queued_at=now)
            self._of_problem[pid].add(key)
            self._outbox[(work.kind, work.model)][key] = None

    # -- sending --------------------------------------------------------------------------
    def batches(self, now: float, route: RouteFn) -> list[Batch]:
        """Take from the outbox what goes now, cut into tasks of the pool's `max_batch`,
        each to the queue `route` picks for its problem (cache affinity).

        A full batch goes at once. A partial one for an in-worker engine waits, for at
        most `HOLD_S` (``scheduling.hold_s``), while its
        queue has as many tasks out as its workers run at once, or while other queues have
        tasks out (their results bring more work for the same pool: problems finish
        their steps at different times). A decode pass costs about the same for 4 rows
        as for 16 (on a GPU, and on a CPU with small models), so fuller tasks are
        cheaper per item; CoRD's steps come in fours (one item per beam), and an idle
        pool was sent each four at once (442 tasks for 48 lab problems, now about 300).
        With nothing else out nothing more can come, so the last problems of a run do
        not wait. A pool behind a server that batches continuously (vLLM, SGLang) gains
        nothing by waiting: its partial batches go at once (``scheduling.hold_s`` unset).
        Call `sent` for every batch sent."""
        out: list[Batch] = []
        on_queue: dict[str, int] = defaultdict(int)
        load: dict[str, int] = defaultdict(int)  # items outstanding per worker, for `route`
        for task in self.tasks.values():
            on_queue[task.queue] += 1
            if task.worker is not None:
                load[task.worker] += len(task.keys)
        for (kind, model), keys in list(self._outbox.items()):
            by_route: dict[Route, list[str]] = defaultdict(list)
            for key in keys:
                by_route[route(self.pending[key].pid, kind, model, load)].append(key)
            spec = self.cfg.pool(model)
            size = spec.max_batch
            hold = self.cfg.scheduling.hold_of(spec.continuous_batching)
            for (queue, worker), routed in by_route.items():
                full = len(routed) - len(routed) % size
                rest = routed[full:]
                if rest and now - min(self.pending[k].queued_at for k in rest) < hold:
                    workers = 1 if worker else max(1, len(self.router.live.get(model, [])))
                    busy = on_queue[queue] >= workers * spec.task_slots
                    others_out = len(self.tasks) - on_queue[queue] > 0
                    if busy or others_out:
                        routed = routed[:full]  # the rest stays in the outbox
                for i in range(0, len(routed), size):
                    chunk = routed[i : i + size]
                    for key in chunk:
                        del keys[key]
                    out.append(
                        Batch(
                            kind,
                            model,
                            queue,
                            worker,
                            chunk,
                            [self.pending[k].work.item for k in chunk],
                            max(self.pending[k].attempt for k in chunk),
                        )
                    )
            if not keys:
                del self._outbox[(kind, model)]
        return out

    def sent(self, batch: Batch, task_id: str, now: float) -> None:
        task = Task(task_id, batch.kind, batch.model, batch.queue, batch.worker, now)
        for key in batch.keys:
            p = self.pending.get(key)
            if p is not None:  # its problem may have ended while the batch was sent
                p.task = task_id
                task.keys.add(key)
        if task.keys:
            self.tasks[task_id] = task

    # -- results ----------------------------------------------------------------------------
    def task_keys(self, task_id: str) -> list[str]:
        """The items `task_id` still carries (none when it is gone or was re-sent)."""
        task = self.tasks.get(task_id)
        return sorted(task.keys) if task else []

    def settle(self, key: str) -> Pending | None:
        """`key` has its result, from whichever task brought it first: it is owed no
        more. None when it was not owed (late or a duplicate)."""
        p = self.pending.get(key)
        if p is not None:  # a late result of an item re-sent may find it in the outbox
            self.drop(key)
        return p

    def requeue(self, key: str, now: float, attempt: bool = True) -> Pending:
        """Send `key` again: out of its task, into the outbox; `attempt` counts one."""
        p = self.pending[key]
        self._detach(p)
        if attempt:
            p.attempt += 1
        p.queued_at = now
        self._outbox[(p.work.kind, p.work.model)][key] = None
        return p

    def close(self, task_id: str) -> list[str]:
        """`task_id` answered: it carries nothing more. Returns the items it still had
        (a result that did not cover them): the caller must requeue or settle each."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return []
        for key in task.keys:
            self.pending[key].task = None
        return sorted(task.keys)

    def forget(self, pid: str) -> None:
        """`pid` ended (done, failed, lease lost): nothing of it is owed any more."""
        for key in list(self._of_problem.get(pid, ())):
            self.drop(key)

    def drop(self, key: str) -> None:
        """Its search no longer waits for `key`, sent or not: it is owed no more, and a
        result that still comes is late."""
        p = self.pending.pop(key, None)
        if p is None:
            return
        self._detach(p)
        self._drop_from_problem(p)
        outbox = self._outbox.get((p.work.kind, p.work.model))
        if outbox is not None:
            outbox.pop(key, None)
            if not outbox:
                del self._outbox[(p.work.kind, p.work.model)]

    def _detach(self, p: Pending) -> None:
        if p.task is None:
            return
        task = self.tasks.get(p.task)
        p.task = None
        if task is not None:
            task.keys.discard(p.key)
            if not task.keys:
                del self.tasks[task.id]

    def _drop_from_problem(self, p: Pending) -> None:
        keys = self._of_problem.get(p.pid)
        if keys is not None:
            keys.discard(p.key)
            if not keys:
                del self._of_problem[p.pid]

    # -- deadlines --------------------------------------------------------------------------
    def check(self, now: float) -> list[Lost]:
        """Sent tasks that will never answer, looked for once a second:

        - waiting in the own queue of a worker that is gone (its liveness key lapsed, or
          it handed a task back): re-routed to a live worker, no attempt counted;
        - running on a worker whose liveness key expired (killed, preempted): lost;
        - running on a live worker for longer than ``task_timeout_s``: hung;
        - running nowhere while its queue is empty, for ``worker_lost_s`` (a worker that
          took it may be too starved to have marked it running yet): the message was lost.

        A task still waiting in a non-empty queue of a live worker (or the shared queue)
        is left alone however long it waits: sending it again would only lengthen the
        queue. The caller requeues the items of each `Lost` (or fails their problems).
        """
        if now < self._next_check:
            return []
        self._next_check = now + CHECK_EVERY_S
        self.router.refresh(now)
        # What waited in a gone worker's own queue is re-routed below from our own
        # records, so its queue can go first.
        self.router.drop_dead_queues()
        tasks = [t for t in self.tasks.values() if now - t.sent_at >= 1.0]
        if not tasks:
            return []
        raw = self.redis.hmget(self.wkeys.running, [t.id for t in tasks])
        workers = [w.decode() if w else None for w in raw]
        pipe = self.redis.pipeline(transaction=False)
        for w in workers:
            if w:
                pipe.exists(self.wkeys.alive(w))
        alive = iter(pipe.execute())
        lengths: dict[str, int] = {}  # queue lengths read this pass
        lost: list[Lost] = []
        for task, worker in zip(tasks, workers, strict=True):
            live = bool(next(alive)) if worker else False
            reason, reroute = self._why_lost(task, worker, live, now, lengths)
            if reason:
                lost.append(Lost(task.id, sorted(task.keys), reason, reroute))
        return lost

    def _why_lost(
        self, task: Task, worker: str | None, live: bool, now: float, lengths: dict[str, int]
    ) -> tuple[str | None, bool]:
        """Why `task` will never answer (None: it may yet), and whether it is only
        re-routed; `worker` runs it (`live`: its liveness key exists)."""
        rel = self.cfg.reliability
        if worker:
            task.vanished_at = None
            if task.started_at is None:
                task.started_at = now
            if not live:
                return f"worker {worker} was lost while running the task", False
            if now - task.started_at > rel.task_timeout_s:
                limit = f"{rel.task_timeout_s:g}s"
                return f"ran over {limit} on {worker} (reliability.task_timeout_s)", False
            return None, False
        if task.worker is not None and not self.router.is_live(task.worker):
            return f"worker {task.worker} left before taking it", True
        if task.queue not in lengths:
            lengths[task.queue] = int(self.redis.llen(task.queue))
        if lengths[task.queue] > 0:
            task.vanished_at = None
            return None, False
        if task.vanished_at is None:
            task.vanished_at = now
        if now - task.vanished_at >= rel.worker_lost_s:
            return "the task vanished: not queued and not running anywhere", False
        return None, False
