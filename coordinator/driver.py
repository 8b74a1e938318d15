"""The coordinator's loop: admit problems, dispatch work in batches, gather results from
the reply stream, commit state, write rows.

Work in flight (every item owed a result, the tasks that carry it, the outbox) is
`InFlight`'s: the loop hands it a strategy's new work, sends the batches it cuts, and
tells it what came back; a result for a key it does not owe is late or a duplicate and
is ignored. A task whose worker died, that ran too long, or that vanished from the
broker is sent again under the same keys (`InFlight.check`; the broker's visibility
timeout alone would take hours); after ``max_attempts`` the problem fails with the
reason. Committed search states go to Redis after every step, so another coordinator
can resume them.

Redis may go away at any moment (a restart, a failover): every step of the loop is
safe to repeat, so a lost connection only pauses the loop until Redis answers again.
Results already applied in memory are committed, and rows already on disk are marked
done, by the next successful pass (`_dirty`, `_closing`); a row is written only while
this coordinator still holds the problem's lease, and never twice.

A failover to a replica may lose the last writes the old primary acknowledged (its
replication is asynchronous): a step's commit (the step is done again), a lease or a
claim (the problem is driven again from its last committed step), a done mark. The rows
on disk decide what is finished, not Redis: a problem is admitted, and a row written,
only when the output folder holds no row of its id (`JsonlWriter.write_once`), and when
another Redis server answers the rows on disk are marked done again (`_reconcile`).
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
from cord.common.keys import TASK_NAMES, Keys, listening
from cord.common.log import get_logger
from cord.common.messages import Generation, Score, TaskRequest, TaskResult
from cord.common.redisconn import connect, primary_address
from cord.coordinator.admission import KVAdmission
from cord.coordinator.inflight import Batch, InFlight
from cord.coordinator.output import JsonlWriter
from cord.coordinator.routing import Router
from cord.coordinator.rows import FailureRow, TraceRow
from cord.coordinator.search import Outcome, Search, Work, WorkKey, make_search, strategy_of
from cord.coordinator.store import Store

Event = Callable[[str, str], None]  # (kind: done|failed, problem id)
Waiting = Callable[[list[str]], None]  # pools that have work and no live worker
WAIT_NOTE_S = 5.0  # how often a run says which pools it waits for


class Observer:
    """What benchmarks and tests may watch of the loop, without reaching into it."""

    def queued(self, pid: str, works: list[Work]) -> None:
        """A problem asked for new work (its first, or after a result)."""

    def served(self, pid: str, model: str, worker: str, key: WorkKey) -> None:
        """`worker` of pool `model` delivered the result of item `key` of `pid`."""

    def replied(self, result: TaskResult, round_trip_s: float) -> None:
        """A reply (or a partial one) came `round_trip_s` after its task was sent."""


@dataclass
class Closing:
    """A problem whose search ended: its row waits to be written and marked done."""

    row: TraceRow | FailureRow
    written: bool = False

    @property
    def failed(self) -> bool:
        return isinstance(self.row, FailureRow)


@dataclass
class Counters:
    tasks_sent: int = 0
    items_sent: int = 0
    redispatched: int = 0
    rerouted: int = 0  # waiting on a worker that left: sent elsewhere, no attempt counted
    late_results: int = 0  # results for items already settled (a re-sent task's twin): ignored
    results: int = 0
    done: int = 0
    failed: int = 0
    resumed: int = 0
    lost_leases: int = 0
    redis_outages: int = 0
    reconciled: int = 0  # open in Redis with a row on disk (a done mark lost): closed, unwritten
    steps: int = 0  # search steps committed (a strategy's own steps: `Outcome.steps`)
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
        observer: Observer | None = None,
        on_wait: Waiting | None = None,
    ) -> None:
        strategy_of(cfg)  # a config the workers accept may name no strategy we know
        self.cfg = cfg
        self.id = coordinator_id or new_coordinator_id()
        self.follow = follow
        self.on_event = on_event
        self.on_wait = on_wait
        self._next_wait_note = 0.0
        self.observer = observer or Observer()
        # Queues always follow cfg.namespace (the workers'); the problem state may live
        # apart, e.g. one namespace per strategy in `cord-coord eval`.
        self.keys = Keys(state_namespace or cfg.namespace)
        self.wkeys = Keys(cfg.namespace)  # what the workers write: running tasks, liveness
        self.redis = connect(cfg.redis_url, health_check_interval=30)
        self.store = Store(self.redis, self.keys)
        self.router = Router(cfg, self.redis, self.wkeys)
        self.inflight = InFlight(cfg, self.redis, self.wkeys, self.router)
        self.kv_room = KVAdmission(cfg) if cfg.scheduling.kv_admission else None
        self._kv_seen = 0  # the router's refreshes the admission has looked at
        self.app = make_celery(cfg)
        self.reply = self.keys.replies(self.id)
        self.writer = JsonlWriter(out_dir, cfg.output.traces_prefix, cfg.output.failed_prefix)
        self.searches: dict[str, Search] = {}
        self._dirty: dict[str, dict[str, Any]] = {}  # snapshots not yet committed
        self._closing: dict[str, Closing] = {}
        self.counters = Counters()
        self.lease_s = cfg.reliability.lease_s
        self.log = get_logger("cord.coordinator", coordinator=self.id)
        self._last_id = "0-0"
        self._next_takeover = 0.0
        self._next_renew = 0.0
        self._stop = False
        self._server: str | None = None  # the Redis server's run id, as last seen

    def sizes(self) -> dict[str, int]:
        """Entries of every structure this coordinator keeps per problem or task: all 0
        when the work has drained (the `--follow` soak asserts it)."""
        return {
            **self.inflight.sizes(),
            "searches": len(self.searches),
            "dirty": len(self._dirty),
            "closing": len(self._closing),
            **self.router.sizes(),
        }

    # -- main loop --------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.monotonic()
        self._wait_for_redis()
        self._server = self._server_id()
        self._listen()  # before any task is sent
        self._reconcile()
        self.router.refresh(time.monotonic())  # route the first work to live workers
        if self.kv_room is not None:  # and admit the first problems by the pools' caches
            self.kv_room.update(self.router.kv, 0)
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
                    self._redis_back()
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
        self._note_missing_workers(time.monotonic())
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

    def _redis_back(self) -> None:
        """After an outage: wait for Redis, then look at which server answers (a failover
        or a restart brings another). Each step may meet a new outage and wait again."""
        while not self._stop:
            self._wait_for_redis()
            try:
                self._listen()
                self._check_server()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.log.warning("redis_lost", error=str(e))

    def _check_server(self) -> None:
        """When another Redis server answers than last time (a failover promoted a
        replica, a server restarted on its AOF), what the old one acknowledged last may be
        missing: say so, and mark the rows on disk done again. Cheap (an INFO): after
        every outage and every lease renewal, since a client may follow a failover without
        an error."""
        server = self._server_id()
        if server == self._server:
            return
        self.log.warning("redis_server_changed", primary=primary_address(self.redis))
        self._server = server
        self._reconcile()

    def _server_id(self) -> str:
        return str(self.redis.info("server").get("run_id", ""))

    def stop(self) -> None:
        self._stop = True

    def pools_without_workers(self) -> list[str]:
        """The config's pools with no live worker, as the router last saw them."""
        return [m for m in self.cfg.model_names if not self.router.live.get(m)]

    def _note_missing_workers(self, now: float) -> None:
        """Every few seconds while there is work and some pool has no live worker, say
        so (a log line, and `on_wait`): otherwise a run with no workers waits in silence."""
        if now < self._next_wait_note:
            return
        self._next_wait_note = now + WAIT_NOTE_S
        missing = self.pools_without_workers()
        if not missing or (not self.searches and self._drained()):
            return
        if self.on_wait is not None:
            self.on_wait(missing)
        else:
            self.log.warning("waiting_for_workers", pools=missing)

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
            # Tasks of ours still queued are dropped unrun by the workers.
            self.redis.delete(self.reply, listening(self.reply))
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Nothing is lost: the leases run out and another coordinator resumes.
            self.log.warning("shutdown_without_redis", error=str(e))

    # -- admission --------------------------------------------------------------------
    def _admit(self, now: float) -> None:
        ceiling = self.cfg.max_in_flight if self.kv_room is None else self.kv_room.room()
        room = ceiling - len(self.searches)
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
        self.writer.index.refresh()  # the rows written since, by us or a coordinator beside
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
            on_disk = self.writer.index.kind(pid)
            if on_disk is not None:  # its done mark was lost (a failover): closed again
                self._closed_on_disk(pid, on_disk)
                continue
            search = make_search(problem, self.cfg)
            if state is not None:
                search.restore(state)
            self.searches[pid] = search
            self._apply(pid, search.start())  # a row already if resumed after its answer

    # -- what a strategy changed ---------------------------------------------------------
    def _apply(self, pid: str, outcome: Outcome) -> None:
        """Take in what one event changed in `pid`'s search: new work to send, a state
        to commit, its row once it finished."""
        for key in outcome.dropped:
            self.inflight.drop(key)
        if outcome.work:
            self.inflight.add(pid, outcome.work, time.monotonic())
            self.observer.queued(pid, outcome.work)
        if outcome.commit:
            self._dirty[pid] = self.searches[pid].snapshot()
            self.counters.steps += outcome.steps
        if outcome.row is not None:
            self._finish(pid, outcome.row)

    # -- dispatch ---------------------------------------------------------------------
    def _flush(self, now: float) -> None:
        """Send the batches `InFlight` cuts from the outbox, each to the queue the
        router picks for its problem (cache affinity)."""
        batches = self.inflight.batches(now, self.router.route)
        if not batches:
            return
        # One producer (one connection) for the whole flush, not one per task.
        with self.app.producer_or_acquire() as producer:
            for batch in batches:
                self.inflight.sent(batch, self._send(batch, producer), now)

    def _send(self, batch: Batch, producer: Any = None) -> str:
        task_id = uuid.uuid4().hex
        req = TaskRequest(
            task_id=task_id,
            kind=batch.kind,
            model=batch.model,
            reply_to=self.reply,
            attempt=batch.attempt,
            stream=self.cfg.scheduling.stream_results,
            **{batch.kind: batch.items},
        )
        self.app.send_task(
            TASK_NAMES[batch.kind],
            args=[req.model_dump(mode="json")],
            queue=batch.queue,
            task_id=task_id,
            producer=producer,
            # What Flower shows as the task's arguments. Celery would otherwise render
            # the whole request with its saferepr (a tenth of the coordinator's CPU in
            # CoRD) into a 1 KiB cut nobody can read.
            argsrepr=f"{batch.kind} x{len(batch.items)} for {batch.model}: {batch.keys[0]} ...",
            kwargsrepr="{}",
        )
        self.counters.tasks_sent += 1
        self.counters.items_sent += len(batch.keys)
        self.counters.by_kind[batch.kind] += len(batch.keys)
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
        now = time.monotonic()
        if result.handed_back:
            self.router.leaving(result.worker, now)
        task = self.inflight.tasks.get(result.task_id)
        if task is not None:
            self.observer.replied(result, now - task.sent_at)
        carried = self.inflight.task_keys(result.task_id)  # not re-sent since
        if result.error:
            self.inflight.close(result.task_id)
            for key in carried:
                if result.handed_back:
                    self._resend(key, result.error, now, attempt=False)
                else:
                    self._retry_or_fail(key, result.error, result.retryable, now)
            return
        items: list[Generation] | list[Score] = result.generations or result.scores
        for item in items:
            if item.error:
                if item.key in carried:  # an error from a task re-sent since counts not
                    self._retry_or_fail(item.key, item.error, item.retryable, now)
                continue
            # The first result for an item wins, whichever task brought it.
            p = self.inflight.settle(item.key)
            if p is None:
                self.counters.late_results += 1
                continue
            search = self.searches.get(p.pid)
            if search is None:
                continue
            self.router.served(p.pid, p.work.model, result.worker)
            if self.kv_room is not None and isinstance(item, Generation):
                self.kv_room.observe(p.pid, p.work.model, item)
            self.observer.served(p.pid, p.work.model, result.worker, p.work.key)
            if isinstance(item, Score):
                outcome = search.on_score(p.work.key, item)
            else:
                outcome = search.on_generation(p.work.key, item)
            self._apply(p.pid, outcome)
        if result.partial:  # more of the task is to come
            return
        for key in self.inflight.close(result.task_id):  # items the result left out
            self._retry_or_fail(key, "the worker's result left this item out", True, now)

    def _resend(self, key: str, error: str, now: float, attempt: bool = True) -> None:
        p = self.inflight.requeue(key, now, attempt=attempt)
        self.counters.redispatched += 1
        self.log.warning("redispatch", problem_id=p.pid, key=key, attempt=p.attempt, error=error)

    def _retry_or_fail(self, key: str, error: str, retryable: bool, now: float) -> None:
        p = self.inflight.get(key)
        if p is None:  # its problem ended meanwhile
            return
        if retryable and p.attempt < self.cfg.reliability.max_attempts:
            self._resend(key, error, now)
            return
        self._fail(
            p.pid, f"{p.work.kind} on {p.work.model} failed after {p.attempt} attempt(s): {error}"
        )

    def _check_deadlines(self, now: float) -> None:
        """Re-send the items of tasks that will never answer (`InFlight.check`), and let
        admission look at the pools' caches the check's registry read brought."""
        lost_tasks = self.inflight.check(now)
        if self.kv_room is not None and self.router.refreshes != self._kv_seen:
            self._kv_seen = self.router.refreshes
            self.kv_room.update(self.router.kv, len(self.searches))
        for lost in lost_tasks:
            for key in lost.keys:
                if self.inflight.get(key) is None:
                    continue
                if lost.reroute:
                    p = self.inflight.requeue(key, now, attempt=False)
                    self.counters.rerouted += 1
                    self.log.info("reroute", problem_id=p.pid, key=key, reason=lost.reason)
                else:
                    self._retry_or_fail(key, lost.reason, True, now)

    def _listen(self) -> None:
        """Say we are here for a lease: workers run our tasks only while we are."""
        self.redis.set(listening(self.reply), self.id, px=int(self.lease_s * 1000))

    def _renew(self, now: float) -> None:
        if now < self._next_renew:
            return
        self._next_renew = now + self.lease_s / 3
        self._listen()
        self._check_server()
        if not (self.searches or self._closing):
            return
        lost = self.store.renew(self.id, [*self.searches, *self._closing], self.lease_s)
        # The reply stream lives while we do: were we killed, it expires (workers set the
        # same TTL on each write, so a late result cannot leave it behind either).
        self.redis.pexpire(self.reply, int(self.cfg.reliability.reply_ttl_s * 1000))
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
    def _forget(self, pid: str) -> Search | None:
        self.inflight.forget(pid)
        if self.kv_room is not None:
            self.kv_room.finished(pid)
        self.router.forget(pid)
        return self.searches.pop(pid, None)

    def _finish(self, pid: str, row: TraceRow) -> None:
        if self._forget(pid) is not None:
            self._closing[pid] = Closing(row)
            self._dirty.pop(pid, None)

    def _fail(self, pid: str, reason: str) -> None:
        search = self._forget(pid)
        if search is not None:
            self._closing[pid] = Closing(search.failure_row(reason))
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
            if not self.writer.write_once(c.row):  # on disk already: Redis lost its mark
                self._closed_on_disk(pid, bool(self.writer.index.kind(pid)))
                self._closing.pop(pid)
                return
            c.written = True
        self.store.finish(pid, failed=c.failed)
        self._closing.pop(pid)
        kind = "failed" if c.failed else "done"
        if isinstance(c.row, FailureRow):
            self.counters.failed += 1
            self.log.warning("problem_failed", problem_id=pid, reason=c.row.reason)
        else:
            self.counters.done += 1
            self.log.info("problem_done", problem_id=pid)
        if self.on_event:
            self.on_event(kind, pid)

    def _closed_on_disk(self, pid: str, failed: bool) -> None:
        """`pid` has a row on disk that Redis does not know of: mark it finished as the
        row says, write nothing."""
        self.store.finish(pid, failed=failed)
        self.counters.reconciled += 1
        self.log.warning("row_already_on_disk", problem_id=pid)

    def _reconcile(self) -> None:
        """Rows on disk whose problem Redis still holds open (a crash between the
        write and the commit, a done mark a failover lost) are closed now, so no row is
        written twice. At the start and when another Redis server answers."""
        traces, failed = self.writer.written_ids()
        fixed = 0
        for ids, is_failed in ((traces, False), (failed, True)):
            open_ids = self.store.unfinished(ids)
            for pid in open_ids:
                self.store.finish(pid, failed=is_failed)
            fixed += len(open_ids)
        if fixed:
            self.counters.reconciled += fixed
            self.log.info("reconciled_output", rows=fixed)
