"""The Celery tasks of a worker pool: ``cord.expand``, ``cord.answer``, ``cord.score``.

Every task goes through `WorkerRuntime.handle`: it validates the message, binds the log
context, runs the engine on the whole batch, classifies failures (retryable or not) and
appends one `TaskResult` to the coordinator's reply stream. Results are never stored in
a Celery backend (docs/runtime-facts: the Redis result backend is slow at this scale).
A task delivered twice computes twice and reports twice; the coordinator keeps the first.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any

import redis
from celery import Celery
from pydantic import ValidationError

from cord.common.keys import TASK_NAMES, Keys
from cord.common.log import get_logger
from cord.common.messages import TaskKind, TaskRequest, TaskResult
from cord.workers.engines import Engine, EngineError

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
    ) -> None:
        self.engine = engine
        self.worker_name = worker_name
        self.redis = redis_client
        self.keys = keys
        self.queues = queues
        self.log = get_logger("cord.worker", worker=worker_name, model=engine.name)
        self.tasks_done = 0
        self._stop = threading.Event()

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
        result = TaskResult(
            task_id=req.task_id, kind=kind, model=req.model, worker=self.worker_name
        )
        try:
            if req.model != self.engine.name or req.kind != kind:
                raise EngineError(
                    f"task for {req.kind}/{req.model} reached worker of {self.engine.name}",
                    retryable=True,
                )
            if kind == "expand":
                result.generations = self.engine.expand(req.expand)
            elif kind == "answer":
                result.generations = self.engine.answer(req.answer)
            else:
                result.scores = self.engine.score(req.score)
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
                raise
            result.error, result.retryable = f"out of memory: {e}", True
        result.elapsed_s = time.perf_counter() - start
        self._reply(req.reply_to, result)
        self.tasks_done += 1
        log.info("task_done", elapsed_s=round(result.elapsed_s, 3), error=result.error)

    def _reply(self, stream: str, result: TaskResult) -> None:
        delay = 0.2
        while True:
            try:
                self.redis.xadd(
                    stream,
                    {"data": result.model_dump_json()},
                    maxlen=REPLY_MAXLEN,
                    approximate=True,
                )
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.log.warning("reply_retry", stream=stream, wait_s=delay, error=str(e))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- registry -------------------------------------------------------------------
    def heartbeat(self) -> None:
        record = {
            "model": self.engine.name,
            "queues": self.queues,
            "host": socket.gethostname(),
            "ts": time.time(),
            "tasks_done": self.tasks_done,
            "engine": self.engine.stats(),
        }
        self.redis.hset(self.keys.workers, self.worker_name, json.dumps(record))

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


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the three task names to `runtime` on `app` (acks late, no stored result)."""
    for kind, name in TASK_NAMES.items():

        def body(payload: Any, _kind: TaskKind = kind) -> None:
            runtime.handle(_kind, payload)

        app.task(name=name, acks_late=True, ignore_result=True, typing=False)(body)
