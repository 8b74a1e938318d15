"""The coordinator's loop: admit problems, dispatch work in batches, gather results from
the reply stream, commit state, write rows.

Each item of work has a stable key. `pending` maps every key still owed a result to
its problem, attempt and send time; a result for a key not in `pending` is late or a
duplicate and is ignored. A task whose worker died, that ran too long, or that vanished
from the broker is sent again under the same keys (`_check_deadlines`; the broker's
visibility timeout alone would take hours); after ``max_attempts`` the problem fails
with the reason. Committed search states go
to Redis after every step, so another coordinator can resume them.

Redis may go away at any moment (a restart, a failover): every step of the loop is
safe to repeat, so a lost connection only pauses the loop until Redis answers again.
Results already applied in memory are committed, and rows already on disk are marked
done, by the next successful pass (`_dirty`, `_closing`); a row is written only while
this coordinator still holds the problem's lease, and never twice.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError

from cord.common.celery_app import make_celery
from cord.common.config import RunConfig
from cord.common.keys import TASK_NAMES, Keys
from cord.common.log import get_logger
from cord.common.messages import Generation, Score, TaskKind, TaskRequest, TaskResult
from cord.coordinator.output import JsonlWriter
from cord.coordinator.routing import Router
from cord.coordinator.search import Failed, Search, Work, make_search
from cord.coordinator.store import Store

Event = Callable[[str, str], None]  # (kind: done|failed, problem id)
HOLD_S = 0.2  # longest a partial batch waits for more work of its pool (`_flush`)


@dataclass
class Pending:
    pid: str
    work: Work
    attempt: int = 1
    sent_at: float | None = None  # None while waiting in the outbox
    queued_at: float = 0.0  # when it last entered the outbox
    task_id: str = ""
    queue: str = ""  # where it was sent: the pool's shared queue or a worker's own
    worker: str | None = None  # the worker whose own queue it was sent to


@dataclass
class Closing:
    """A problem whose search ended: its row waits to be written and marked done."""

    row: dict[str, Any]
    failed: bool
    written: bool = False


@dataclass
class Counters:
    tasks_sent: int = 0
    items_sent: int = 0
    redispatched: int = 0
    rerouted: int = 0  # waiting on a worker that left: sent elsewhere, no attempt counted
    duplicates: int = 0
    results: int = 0
    done: int = 0
    failed: int = 0
    resumed: int = 0
    lost_leases: int = 0
    redis_outages: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def new_coordinator_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Coordinator:
    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str,
        coordinator_id: str | None = None,
        follow: bool = False,
        on_event: Event | None = None,
        state_namespace: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.id = coordinator_id or new_coordinator_id()
        self.follow = follow
        self.on_event = on_event
        # Queues always follow cfg.namespace (the workers'); the problem state may live
        # apart, e.g. one namespace per strategy in `cord-coord eval`.
        self.keys = Keys(state_namespace or cfg.namespace)
        self.wkeys = Keys(cfg.namespace)  # what the workers write: running tasks, liveness
        self.redis = redis.Redis.from_url(cfg.redis_url, health_check_interval=30)
        self.store = Store(self.redis, self.keys)
        self.router = Router(cfg, self.redis, self.wkeys)
        self.app = make_celery(cfg)
        self.reply = self.keys.replies(self.id)
        self.writer = JsonlWriter(out_dir, cfg.output.traces_prefix, cfg.output.failed_prefix)
        self.searches: dict[str, Search] = {}
        self.pending: dict[str, Pending] = {}
        self.keys_of: dict[str, set[str]] = defaultdict(set)
        self.outbox: dict[tuple[TaskKind, str], list[str]] = defaultdict(list)
        self._open_tasks: dict[str, dict[str, float]] = defaultdict(dict)  # queue -> task -> sent
        self._queue_of: dict[str, str] = {}  # unanswered task -> its queue
        self.tasks: dict[str, list[str]] = {}
        self._dirty: dict[str, dict[str, Any]] = {}  # snapshots not yet committed
        self._closing: dict[str, Closing] = {}
        self.counters = Counters()
        self.lease_s = cfg.reliability.lease_s
        self.log = get_logger("cord.coordinator", coordinator=self.id)
        self._last_id = "0-0"
        self._next_takeover = 0.0
        self._next_renew = 0.0
        self._next_deadline_check = 0.0
        self._vanished: dict[str, float] = {}  # task id -> first found neither queued nor running
        self._started: dict[str, float] = {}  # task id -> when first seen running
        self._stop = False

    # -- main loop --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.monotonic()
        self._wait_for_redis()
        self._reconcile()
        self.router.refresh(time.monotonic())  # route the first work to live workers
        self.log.info(
            "coordinator_started",
            namespace=self.cfg.namespace,
            max_in_flight=self.cfg.max_in_flight,
            strategy=self.cfg.search.strategy,
        )
        try:
            while not self._stop:
                try:
                    if self._step():
                        break
                except (redis.ConnectionError, redis.TimeoutError, OperationalError) as e:
                    self.counters.redis_outages += 1
                    self.log.warning("redis_lost", error=str(e))
                    self._wait_for_redis()
        finally:
            self._shutdown()
        summary = {**self.counters.__dict__, "wall_s": round(time.monotonic() - start, 3)}
        summary["by_kind"] = dict(self.counters.by_kind)
        self.log.info("coordinator_finished", **summary)
        return summary

    def _step(self) -> bool:
        """One pass of the loop; True when all work is done. Safe to repeat after a
        Redis error at any point."""
        self._persist()
        now = time.monotonic()
        self._admit(now)
        self._flush(now)
        self._read(block_ms=50 if self.searches else 250)  # persists what it applied
        self._check_deadlines(time.monotonic())
        self._renew(time.monotonic())
        return not self.searches and not self._closing and not self.follow and self._drained()

    def _wait_for_redis(self) -> None:
        delay = 0.5
        while not self._stop:
            try:
                self.redis.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.log.warning("redis_unreachable", error=str(e), wait_s=delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def stop(self) -> None:
        self._stop = True

    def _drained(self) -> bool:
        """All enqueued work is done: nothing waits and nobody holds a problem. Problems
        a dead coordinator held are taken over when their lease runs out."""
        counts = self.store.counts()
        return counts["queued"] == 0 and counts["in_flight"] == 0

    def _shutdown(self) -> None:
        try:
            self._persist()
            if self.searches:  # a clean stop hands unfinished problems back at once
                self.store.release(self.id, self.searches)
                self.log.info("released_problems", count=len(self.searches))
            self.redis.delete(self.reply)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Nothing is lost: the leases run out and another coordinator resumes.
            self.log.warning("shutdown_without_redis", error=str(e))

    # -- admission --------------------------------------------------------------------
    def _admit(self, now: float) -> None:
        room = self.cfg.max_in_flight - len(self.searches)
        if room <= 0:
            return
        ids: list[str] = []
        if now >= self._next_takeover:
            # Our own expired leases come back too (renewal late after a stall or a Redis
            # outage): the ones we still hold are simply ours again, not resumed.
            taken = self.store.take_over(self.id, room, self.lease_s)
            ids = [i for i in taken if i not in self.searches and i not in self._closing]
            self._next_takeover = now + self.lease_s / 3
            self.counters.resumed += len(ids)
        ids += self.store.claim(self.id, room - len(ids), self.lease_s)
        ids = list(dict.fromkeys(ids))
        if not ids:
            return
        for pid, problem, state in zip(
            ids, self.store.problems(ids), self.store.states(ids), strict=True
        ):
            if problem is None:
                self.log.error("unknown_problem", problem_id=pid)
                self.store.finish(pid, failed=True)
                continue
            if self.store.is_finished(pid):
                self.store.finish(pid)
                continue
            search = make_search(problem, self.cfg)
            if state is not None:
                search.restore(state)
            self.searches[pid] = search
            self._queue(pid, search.start())
            if search.finished:  # resumed after its last result was committed
                self._finish(pid)

    # -- dispatch ---------------------------------------------------------------------
    def _queue(self, pid: str, works: list[Work]) -> None:
        for work in works:
            key = work.item.key
            if key in self.pending:
                continue
            self.pending[key] = Pending(pid, work, queued_at=time.monotonic())
            self.keys_of[pid].add(key)
            self.outbox[(work.kind, work.model)].append(key)

    def _flush(self, now: float) -> None:
        """Send what the outbox holds, in batches of the pool's `max_batch`, each to the
        queue the router picks for its problem (cache affinity).

        A full batch goes at once. A partial one waits, for at most `HOLD_S`, while its
        queue's workers are busy with earlier tasks or while other tasks are out (their
        results bring more work for the same pool: problems finish their steps at
        different times). A decode pass costs about the same for 4 rows as for 16 (on a
        GPU, and on a CPU with small models), so fuller tasks are cheaper per item;
        CoRD's steps come in fours (one item per beam), and an idle pool was sent each
        four at once (442 tasks for 48 lab problems, now about 300). With nothing else
        out nothing more can come, so the last problems of a run do not wait."""
        held: dict[tuple[TaskKind, str], list[str]] = defaultdict(list)
        sent: set[str] = set()  # by this flush: they bring no work before it ends
        for (kind, model), keys in self.outbox.items():
            by_queue: dict[tuple[str, str | None], list[str]] = defaultdict(list)
            for k in dict.fromkeys(keys):
                if k in self.pending:
                    by_queue[self.router.route(self.pending[k].pid, kind, model)].append(k)
            batch = self.cfg.pool(model).max_batch
            # One producer (one connection) for the whole flush, not one per task.
            with self.app.producer_or_acquire() as producer:
                for (queue, worker), routed in by_queue.items():
                    full = len(routed) - len(routed) % batch
                    rest = routed[full:]
                    if (
                        rest
                        and (self._busy(queue, model, worker, now) or self._others_out(queue, sent))
                        and now - min(self.pending[k].queued_at for k in rest) < HOLD_S
                    ):
                        held[(kind, model)] += rest
                        routed = routed[:full]
                    for i in range(0, len(routed), batch):
                        sent.add(
                            self._send(
                                kind, model, routed[i : i + batch], now, queue, worker, producer
                            )
                        )
        self.outbox = held

    def _others_out(self, queue: str, sent: set[str]) -> bool:
        """Is a task out, sent before this flush (`sent`: by it), that `queue` did not
        get? Its results can bring more work."""
        mine = sum(1 for t in self._open_tasks[queue] if t not in sent and t in self.tasks)
        return len(self.tasks) - len(sent) - mine > 0

    def _close_task(self, task_id: str) -> None:
        """`task_id` answered, or will not be waited for any more."""
        queue = self._queue_of.pop(task_id, None)
        if queue is not None:
            self._open_tasks[queue].pop(task_id, None)

    def _busy(self, queue: str, model: str, worker: str | None, now: float) -> bool:
        """Has `queue` as many unanswered tasks as workers to run them? Tasks older than
        `task_timeout_s` are forgotten here (their fate is `_check_deadlines`'s)."""
        open_ = self._open_tasks[queue]
        stale = now - self.cfg.reliability.task_timeout_s
        for tid in [t for t, sent in open_.items() if sent < stale]:
            self._close_task(tid)
        workers = 1 if worker is not None else max(1, len(self.router.live.get(model, [])))
        return len(open_) >= workers

    def _send(
        self,
        kind: TaskKind,
        model: str,
        keys: list[str],
        now: float,
        queue: str,
        worker: str | None,
        producer: Any = None,
    ) -> str:
        task_id = uuid.uuid4().hex
        items = [self.pending[k].work.item for k in keys]
        attempt = max(self.pending[k].attempt for k in keys)
        req = TaskRequest(
            task_id=task_id,
            kind=kind,
            model=model,
            reply_to=self.reply,
            attempt=attempt,
            **{kind: items},
        )
        self.app.send_task(
            TASK_NAMES[kind],
            args=[req.model_dump(mode="json")],
            queue=queue,
            task_id=task_id,
            producer=producer,
            # What Flower shows as the task's arguments. Celery would otherwise render
            # the whole request with its saferepr (a tenth of the coordinator's CPU in
            # CoRD) into a 1 KiB cut nobody can read.
            argsrepr=f"{kind} x{len(items)} for {model}: {keys[0]} ...",
            kwargsrepr="{}",
        )
        for k in keys:
            p = self.pending[k]
            p.sent_at, p.task_id, p.queue, p.worker = now, task_id, queue, worker
        self._open_tasks[queue][task_id] = now
        self._queue_of[task_id] = queue
        self.tasks[task_id] = keys
        self.counters.tasks_sent += 1
        self.counters.items_sent += len(keys)
        self.counters.by_kind[kind] += len(keys)
        return task_id

    # -- results ----------------------------------------------------------------------
    def _read(self, block_ms: int) -> None:
        try:
            reply = self.redis.xread({self.reply: self._last_id}, count=512, block=block_ms)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self.log.warning("redis_unreachable", error=str(e), wait_s=1.0)
            time.sleep(1.0)
            return
        if not reply:
            return
        entries = reply[0][1]
        for _entry_id, fields in entries:
            self._on_result(TaskResult.model_validate_json(fields[b"data"]))
        # Applied in memory: never read these again, whatever fails next.
        self._last_id = entries[-1][0].decode()
        for pid in [p for p in self._dirty if p in self.searches and self.searches[p].finished]:
            self._finish(pid)
        self._persist()
        self.redis.xdel(self.reply, *[e[0] for e in entries])

    def _persist(self) -> None:
        """Commit the snapshots taken since the last commit, then write and close the
        finished problems. Idempotent: after a Redis error the next pass completes it."""
        if self._dirty:
            self.store.commit({p: s for p, s in self._dirty.items() if p in self.searches})
            self._dirty.clear()
        for pid in list(self._closing):
            self._close(pid, self._closing[pid])

    def _on_result(self, result: TaskResult) -> None:
        self.counters.results += 1
        keys = self.tasks.pop(result.task_id, [])
        self._close_task(result.task_id)
        if result.handed_back:
            self.router.leaving(result.worker, time.monotonic())
        if result.error:
            for key in keys:
                p = self.pending.get(key)
                if p is not None and p.task_id == result.task_id:
                    if result.handed_back:
                        self._resend(key, result.error)
                    else:
                        self._retry_or_fail(key, result.error, result.retryable)
            return
        items: list[Generation] | list[Score] = result.generations or result.scores
        for item in items:
            p = self.pending.get(item.key)
            if p is None:
                self.counters.duplicates += 1
                continue
            if item.error:
                self._retry_or_fail(item.key, item.error, item.retryable)
                continue
            self._drop_key(item.key)
            search = self.searches.get(p.pid)
            if search is None:
                continue
            self.router.served(p.pid, p.work.model, result.worker)
            try:
                if isinstance(item, Score):
                    new = search.on_score(item.key, item)
                else:
                    new = search.on_generation(item.key, item)
            except Failed as e:
                self._fail(p.pid, f"{p.work.kind} on {p.work.model}: {e}")
                continue
            self._queue(p.pid, new)
            if search.committed:
                search.committed = False
                self._dirty[p.pid] = search.snapshot()

    def _resend(self, key: str, error: str) -> None:
        p = self._requeue(key)
        self.counters.redispatched += 1
        self.log.warning("redispatch", problem_id=p.pid, key=key, attempt=p.attempt, error=error)

    def _requeue(self, key: str) -> Pending:
        """Put `key` back in the outbox; its task is not waited for any more."""
        p = self.pending[key]
        self._close_task(p.task_id)
        p.sent_at, p.queued_at = None, time.monotonic()
        self.outbox[(p.work.kind, p.work.model)].append(key)
        return p

    def _retry_or_fail(self, key: str, error: str, retryable: bool) -> None:
        p = self.pending[key]
        if retryable and p.attempt < self.cfg.reliability.max_attempts:
            p.attempt += 1
            self._resend(key, error)
            return
        self._fail(
            p.pid, f"{p.work.kind} on {p.work.model} failed after {p.attempt} attempt(s): {error}"
        )

    def _check_deadlines(self, now: float) -> None:
        """Find sent tasks that will never answer, once a second:

        - waiting in the own queue of a worker that is gone (its liveness key lapsed, or
          it handed a task back): re-routed to a live worker, no attempt counted;
        - running on a worker whose liveness key expired (killed, preempted): lost;
        - running on a live worker for longer than ``task_timeout_s``: hung;
        - running nowhere while its queue is empty, for ``worker_lost_s`` (a worker that
          took it may be too starved to have marked it running yet): the message was lost.

        A task still waiting in a non-empty queue of a live worker (or the shared queue)
        is left alone however long it waits: sending it again would only lengthen the
        queue. Lost, hung and vanished tasks cost an attempt.
        """
        if now < self._next_deadline_check:
            return
        self._next_deadline_check = now + 1.0
        self.router.refresh(now)
        by_task: dict[str, list[str]] = defaultdict(list)
        for key, p in self.pending.items():
            if p.sent_at is not None and now - p.sent_at >= 1.0:
                by_task[p.task_id].append(key)
        tids = list(by_task)
        workers = (
            [w.decode() if w else None for w in self.redis.hmget(self.wkeys.running, tids)]
            if tids
            else []
        )
        pipe = self.redis.pipeline(transaction=False)
        for w in workers:
            if w:
                pipe.exists(self.wkeys.alive(w))
        alive = iter(pipe.execute())
        lengths: dict[str, int] = {}
        vanished: dict[str, float] = {}
        for tid, worker in zip(tids, workers, strict=True):
            first = self.pending[by_task[tid][0]]
            reason = None
            if worker:
                started = self._started.setdefault(tid, now)
                if not next(alive):
                    reason = f"worker {worker} was lost while running the task"
                elif now - started > self.cfg.reliability.task_timeout_s:
                    reason = (
                        f"ran over {self.cfg.reliability.task_timeout_s:g}s on {worker} "
                        "(reliability.task_timeout_s)"
                    )
            elif first.worker is not None and not self.router.is_live(first.worker):
                for key in by_task[tid]:
                    self._reroute(key, first.worker)
                continue
            else:
                if first.queue not in lengths:
                    lengths[first.queue] = int(self.redis.llen(first.queue))
                if lengths[first.queue] == 0:
                    seen = vanished[tid] = self._vanished.get(tid, now)
                    if now - seen >= self.cfg.reliability.worker_lost_s:
                        reason = "the task vanished: not queued and not running anywhere"
            if reason:
                self._started.pop(tid, None)
                vanished.pop(tid, None)
                for key in by_task[tid]:
                    if key in self.pending:
                        self._retry_or_fail(key, reason, retryable=True)
        self._vanished = vanished
        for tid in [t for t in self._started if t not in by_task]:
            del self._started[tid]
        self.router.drop_dead_queues()

    def _reroute(self, key: str, worker: str) -> None:
        """Re-send a task that waited for a worker that left before taking it."""
        p = self._requeue(key)
        self.counters.rerouted += 1
        self.log.info("reroute", problem_id=p.pid, key=key, worker=worker)

    def _renew(self, now: float) -> None:
        if now < self._next_renew or not (self.searches or self._closing):
            return
        lost = self.store.renew(self.id, [*self.searches, *self._closing], self.lease_s)
        # The reply stream lives while we do: were we killed, it expires (workers set the
        # same TTL on each write, so a late result cannot leave it behind either).
        self.redis.pexpire(self.reply, int(self.cfg.reliability.reply_ttl_s * 1000))
        self._next_renew = now + self.lease_s / 3
        for pid in lost:
            self._drop_lost(pid)

    def _drop_lost(self, pid: str) -> None:
        """Another coordinator holds `pid` now (we could not renew in time): stop
        driving it and write nothing for it."""
        self._forget(pid)
        self._dirty.pop(pid, None)
        self._closing.pop(pid, None)
        self.counters.lost_leases += 1
        self.log.warning("lease_lost", problem_id=pid)

    # -- endings ----------------------------------------------------------------------
    def _drop_key(self, key: str) -> None:
        p = self.pending.pop(key, None)
        if p is not None:
            self.keys_of[p.pid].discard(key)

    def _forget(self, pid: str) -> Search | None:
        for key in self.keys_of.pop(pid, set()):
            self.pending.pop(key, None)
        self.router.forget(pid)
        return self.searches.pop(pid, None)

    def _finish(self, pid: str) -> None:
        search = self._forget(pid)
        if search is not None:
            self._closing[pid] = Closing(search.row(), failed=False)
            self._dirty.pop(pid, None)

    def _fail(self, pid: str, reason: str) -> None:
        search = self._forget(pid)
        if search is None:
            return
        p = search.problem
        row = {
            **p.meta,
            "id": p.id,
            "question": p.question,
            "reference_answer": p.answer,
            "reason": reason,
            "strategy": search.name,
            "state": search.snapshot(),
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._closing[pid] = Closing(row, failed=True)
        self._dirty.pop(pid, None)

    def _close(self, pid: str, c: Closing) -> None:
        """Write the row once (while the lease is still ours), then mark it finished.
        Raises on a Redis error with the state kept for the next pass."""
        if not c.written:
            if self.store.is_finished(pid):  # someone else closed it
                self._closing.pop(pid)
                return
            if self.store.renew(self.id, [pid], self.lease_s):  # fencing: still ours?
                self._drop_lost(pid)
                return
            self.writer.write(c.row, failed=c.failed)
            c.written = True
        self.store.finish(pid, failed=c.failed)
        self._closing.pop(pid)
        kind = "failed" if c.failed else "done"
        if c.failed:
            self.counters.failed += 1
            self.log.warning("problem_failed", problem_id=pid, reason=c.row.get("reason"))
        else:
            self.counters.done += 1
            self.log.info("problem_done", problem_id=pid)
        if self.on_event:
            self.on_event(kind, pid)

    def _reconcile(self) -> None:
        """Rows on disk whose problem Redis still holds open (a crash between the
        write and the commit) are closed now, so no row is written twice."""
        traces, failed = self.writer.written_ids()
        fixed = 0
        for ids, is_failed in ((traces, False), (failed, True)):
            open_ids = self.store.unfinished(ids)
            for pid in open_ids:
                self.store.finish(pid, failed=is_failed)
            fixed += len(open_ids)
        if fixed:
            self.log.info("reconciled_output", rows=fixed)
