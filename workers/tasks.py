"""The Celery tasks of a worker pool: ``cord.expand``, ``cord.answer``, ``cord.score``.

Every task goes through `WorkerRuntime.handle`: it validates the message, binds the log
context, runs the engine on the whole batch, classifies failures (retryable or not) and
appends one `TaskResult` to the coordinator's reply stream. A task that asks for it
(``stream``) on an engine whose items finish at different times (a server's continuous
batch) gets a partial result per group of items as they finish, and its last result
carries the rest: a finished candidate is scored while the slowest of its task runs.
Results are never stored in a Celery backend (docs/method.md: the Redis result backend
is slow at this scale).
A task delivered twice computes twice and reports twice; the coordinator keeps the first.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import redis
from celery import Celery
from pydantic import ValidationError

from cord.common.keys import TASK_NAMES, Keys, listening
from cord.common.log import get_logger
from cord.common.messages import Generation, Heartbeat, Score, TaskKind, TaskRequest, TaskResult
from cord.workers.engines import Engine, EngineError, serve
from cord.workers.metrics import WorkerMetrics

REPLY_MAXLEN = 100_000


class WorkerRuntime:
    """What a worker process holds: its engine (loaded once), its name and Redis."""

    def __init__(
        self,
        engine: Engine,
        worker_name: str,
        redis_client: redis.Redis,
        keys: Keys,
        queues: list[str],
        lost_after_s: float = 15.0,
        reply_ttl_s: float = 600.0,
    ) -> None:
        self.engine = engine
        self.worker_name = worker_name
        self.redis = redis_client
        self.keys = keys
        self.queues = queues
        self.lost_after_s = lost_after_s
        self.reply_ttl_ms = int(reply_ttl_s * 1000)
        self.log = get_logger("cord.worker", worker=worker_name, model=engine.name)
        self.tasks_done = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current: dict[str, TaskRequest] = {}  # tasks the engine is running, by id
        self._handed_back: set[str] = set()
        self.metrics = WorkerMetrics(self)  # tokens per minute, latency, /metrics

    # -- tasks ----------------------------------------------------------------------
    def handle(self, kind: TaskKind, payload: Any) -> None:
        start = time.perf_counter()
        try:
            req = TaskRequest.model_validate(payload)
        except ValidationError as e:
            # No reply stream can be trusted in a malformed message: log and drop.
            self.log.error("bad_task_message", kind=kind, error=str(e))
            return
        log = self.log.bind(
            task_id=req.task_id, kind=kind, items=len(req.keys()), attempt=req.attempt
        )
        if not self.redis.exists(listening(req.reply_to)):
            # Its coordinator stopped (an interrupted run) or is dead for a lease (its
            # problems go to another, which sends its own tasks): nobody would read it.
            log.info("task_dropped_coordinator_gone")
            return
        result = TaskResult(
            task_id=req.task_id, kind=kind, model=req.model, worker=self.worker_name
        )
        with self._lock:
            self._current[req.task_id] = req
        self._mark_running(req.task_id)
        sent: set[str] = set()  # keys a partial result carried

        def emit(items: list[Any]) -> None:
            with self._lock:
                if req.task_id in self._handed_back:
                    return
            gens = [i for i in items if isinstance(i, Generation)]
            scores = [i for i in items if isinstance(i, Score)]
            with self._lock:  # a server engine's items end in its pool's threads
                sent.update(i.key for i in items)
            self._reply(
                req.reply_to,
                result.model_copy(
                    update={
                        "generations": gens,
                        "scores": scores,
                        "partial": True,
                        "elapsed_s": time.perf_counter() - start,
                    }
                ),
            )

        try:
            if req.model != self.engine.name or req.kind != kind:
                raise EngineError(
                    f"task for {req.kind}/{req.model} reached worker of {self.engine.name}",
                    retryable=True,
                )
            result.generations, result.scores = serve(
                self.engine, req, emit if req.stream else None
            )
        except EngineError as e:
            result.error, result.retryable = str(e), e.retryable
        except Exception as e:
            if type(e).__name__ != "OutOfMemoryError":
                log.exception("task_crashed")
                self._reply(
                    req.reply_to,
                    result.model_copy(
                        update={"error": f"{type(e).__name__}: {e}", "retryable": True}
                    ),
                )
                self._unmark_running(req.task_id)  # answered: not running any more
                raise
            result.error, result.retryable = f"out of memory: {e}", True
        finally:
            with self._lock:
                self._current.pop(req.task_id, None)
                handed_back = req.task_id in self._handed_back
                self._handed_back.discard(req.task_id)
        if handed_back:  # the coordinator has sent it elsewhere; this copy is late
            log.info("task_done_after_hand_back")
            return
        result.elapsed_s = time.perf_counter() - start
        self.metrics.observe(kind, result)  # every item's tokens, the streamed ones too
        if sent:
            result.generations = [g for g in result.generations if g.key not in sent]
            result.scores = [s for s in result.scores if s.key not in sent]
        self._reply(req.reply_to, result)
        self._unmark_running(req.task_id)
        with self._lock:  # tasks may run at once (a server engine)
            self.tasks_done += 1
        log.info("task_done", elapsed_s=round(result.elapsed_s, 3), error=result.error)

    @property
    def busy(self) -> bool:
        return bool(self._current)

    def hand_back(self, reason: str) -> list[str]:
        """Tell the coordinator the running tasks will not finish here (the worker is
        going away), so they are sent elsewhere at once. Returns their task ids."""
        with self._lock:
            reqs = list(self._current.values())
            self._handed_back.update(r.task_id for r in reqs)
        for req in reqs:
            self._reply(
                req.reply_to,
                TaskResult(
                    task_id=req.task_id,
                    kind=req.kind,
                    model=req.model,
                    worker=self.worker_name,
                    error=f"handed back: {reason}",
                    retryable=True,
                    handed_back=True,
                ),
            )
            self._unmark_running(req.task_id)
            self.log.warning("task_handed_back", task_id=req.task_id, reason=reason)
        return [r.task_id for r in reqs]

    def _mark_running(self, task_id: str) -> None:
        # Best effort: without the mark the coordinator takes the task for lost once
        # its queue is empty, and sends it again (a duplicate, ignored).
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.redis.hset(self.keys.running, task_id, self.worker_name)

    def _unmark_running(self, task_id: str) -> None:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.redis.hdel(self.keys.running, task_id)

    def _reply(self, stream: str, result: TaskResult) -> None:
        delay = 0.2
        while True:
            try:
                # One round trip: the result, and the stream's expiry pushed out (a
                # coordinator killed mid-run leaves no stream behind for good).
                pipe = self.redis.pipeline(transaction=False)
                pipe.xadd(
                    stream,
                    {"data": result.model_dump_json()},
                    maxlen=REPLY_MAXLEN,
                    approximate=True,
                )
                pipe.pexpire(stream, self.reply_ttl_ms)
                pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.log.warning("reply_retry", stream=stream, wait_s=delay, error=str(e))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- registry -------------------------------------------------------------------
    def heartbeat(self) -> None:
        record = Heartbeat(
            model=self.engine.name,
            queues=self.queues,
            host=socket.gethostname(),
            ts=time.time(),
            tasks_done=self.tasks_done,
            engine=self.engine.stats(),
            **self.metrics.heartbeat_fields(),
        )
        pipe = self.redis.pipeline()
        pipe.hset(self.keys.workers, self.worker_name, record.model_dump_json())
        pipe.set(self.keys.alive(self.worker_name), 1, px=int(self.lost_after_s * 1000))
        pipe.execute()

    def start_heartbeat(self, every_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.heartbeat()
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    self.log.warning("heartbeat_failed", error=str(e))
                self._stop.wait(every_s)

        thread = threading.Thread(target=loop, name="cord-heartbeat", daemon=True)
        thread.start()
        return thread

    def deregister(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.redis.hdel(self.keys.workers, self.worker_name)
            self.redis.delete(self.keys.alive(self.worker_name))


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the three task names to `runtime` on `app` (acks late, no stored result)."""
    for kind, name in TASK_NAMES.items():

        def body(payload: Any, _kind: TaskKind = kind) -> None:
            runtime.handle(_kind, payload)

        app.task(name=name, acks_late=True, ignore_result=True, typing=False)(body)
