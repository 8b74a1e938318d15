"""Cache-affine routing: which queue a piece of work goes to.

Step-wise decoding re-sends a growing prefix every step. A worker that served the
previous step of a problem holds that prefix in its cache (the `hf` engine's prefix
cache, SGLang's radix cache), so the next step costs only the new tokens there and a
full prefill anywhere else. Every worker consumes its pool's shared queue and a private
queue of its own (`keys.private_queue`); the router sends a problem's work for a pool to
the worker of that pool that served the problem last, while that worker is alive. A
problem new to a pool goes to its least loaded live worker (fewest items outstanding,
then fewest problems held), so new problems spread across the pool.

A problem's work varies (3 to 10 steps in the lab), so whole problems split evenly
still load one worker more than another. A problem moves only when its worker has more
than ``routing.balance_tasks`` tasks' worth of items outstanding (sent, not answered)
beyond the least loaded worker of its pool: each move costs a prefill where the prefix
is not cached, so the threshold is set for a worker that falls far behind (a slow GPU,
a straggler), not for the ordinary spread (CHANGELOG.md has the measurement that chose
its default). With no live worker known, or with ``routing.affinity: false``, work goes to the
shared queue, which any worker takes.

Liveness is read from the workers' registry and their TTL'd liveness keys
(`keys.Keys.alive`), once a second: a worker whose key lapsed, or that handed a task
back because it is shutting down, is gone; its problems move to other workers, and the
driver re-sends what was waiting in its private queue (`orphaned`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys, private_queue, queue_name
from cord.common.messages import EngineStats, Heartbeat, TaskKind


@dataclass(frozen=True)
class PoolKV:
    """A pool's KV caches and queues, summed over its live workers (their heartbeats)."""

    capacity: int
    used: int
    running: int
    waiting: int

    @classmethod
    def of(cls, stats: list[EngineStats]) -> PoolKV | None:
        """None unless every worker reports all four."""
        rows = [
            (e.kv_capacity_tokens, e.kv_used_tokens, e.requests_running, e.requests_waiting)
            for e in stats
        ]
        if not rows or any(v is None for row in rows for v in row):
            return None
        return cls(*(sum(int(row[i] or 0) for row in rows) for i in range(4)))


class Router:
    def __init__(self, cfg: RunConfig, client: redis.Redis, keys: Keys) -> None:
        self.cfg = cfg
        self.redis = client
        self.keys = keys
        self.affinity = cfg.routing.affinity
        self.live: dict[str, list[str]] = defaultdict(list)  # model -> live workers
        self._model_of: dict[str, str] = {}  # live worker -> model
        self._sticky: dict[tuple[str, str], str] = {}  # (problem, model) -> worker
        self._held: dict[str, int] = defaultdict(int)  # worker -> problems it holds
        # Workers that handed a task back (shutting down), until when to ignore them: a
        # worker restarted under the same name (honcho, k8s) is welcome again after.
        self._leaving: dict[str, float] = {}
        self._used: set[str] = set()  # workers we sent private work to (for cleanup)
        # model -> its live workers' KV caches and queues, where every one reports them
        self.kv: dict[str, PoolKV] = {}
        self.refreshes = 0  # looks at the registry so far

    # -- liveness -------------------------------------------------------------------
    def refresh(self, now: float) -> set[str]:
        """Re-read which workers are alive. Returns the workers that were live and are
        gone now; their problems are unassigned (routed afresh on their next work)."""
        self._leaving = {w: t for w, t in self._leaving.items() if t > now}
        records = {k.decode(): v for k, v in self.redis.hgetall(self.keys.workers).items()}
        pipe = self.redis.pipeline(transaction=False)
        for name in records:
            pipe.exists(self.keys.alive(name))
        beats = {
            name: Heartbeat.model_validate_json(raw)
            for (name, raw), alive in zip(records.items(), pipe.execute(), strict=True)
            if alive and name not in self._leaving
        }
        model_of = {name: beat.model for name, beat in beats.items()}
        engines: dict[str, list[EngineStats]] = defaultdict(list)
        for beat in beats.values():
            engines[beat.model].append(beat.engine)
        self.kv = {m: kv for m, stats in engines.items() if (kv := PoolKV.of(stats))}
        self.refreshes += 1
        gone = set(self._model_of) - set(model_of)
        self._set_live(model_of)
        for worker in gone:
            self._unassign(worker)
        return gone

    def leaving(self, worker: str, now: float) -> None:
        """`worker` handed a task back (SIGTERM): send it nothing more."""
        self._leaving[worker] = now + self.cfg.reliability.worker_lost_s
        self._set_live({w: m for w, m in self._model_of.items() if w != worker})
        self._unassign(worker)

    def _set_live(self, model_of: dict[str, str]) -> None:
        self._model_of = model_of
        self.live = defaultdict(list)
        for name, model in sorted(model_of.items()):
            self.live[model].append(name)

    def is_live(self, worker: str) -> bool:
        return worker in self._model_of

    def _unassign(self, worker: str) -> None:
        for key in [k for k, w in self._sticky.items() if w == worker]:
            del self._sticky[key]
        self._held.pop(worker, None)

    # -- routing --------------------------------------------------------------------
    def route(
        self, pid: str, kind: TaskKind, model: str, load: dict[str, int] | None = None
    ) -> tuple[str, str | None]:
        """The queue for `pid`'s next work of `kind` on pool `model`, and the worker it
        is meant for (None: the shared queue). `load`: items outstanding per worker
        (`InFlight.batches` counts them), raised here by the item routed."""
        shared = queue_name(self.cfg.namespace, kind, model)
        candidates = self.live.get(model, [])
        if not self.affinity or not candidates:
            return shared, None
        load = load if load is not None else {}
        least = min(candidates, key=lambda w: (load.get(w, 0), self._held[w], w))
        worker = self._sticky.get((pid, model))
        if (
            worker is None
            or worker not in self._model_of
            or self._overloaded(model, load.get(worker, 0), load.get(least, 0))
        ):
            worker = least
            self._assign(pid, model, worker)
        load[worker] = load.get(worker, 0) + 1
        self._used.add(worker)
        return private_queue(self.cfg.namespace, kind, model, worker), worker

    def _overloaded(self, model: str, mine: int, least: int) -> bool:
        """A worker with this many items outstanding, against the pool's least loaded,
        should give a problem away (see the module docstring)."""
        spec = self.cfg.pool(model)
        return mine - least > self.cfg.routing.balance_tasks * spec.max_batch * spec.task_slots

    def served(self, pid: str, model: str, worker: str) -> None:
        """`worker` served `pid`'s work on `model`: its cache holds the prefix now."""
        if self.affinity and worker in self._model_of and self._sticky.get((pid, model)) != worker:
            self._assign(pid, model, worker)

    def _assign(self, pid: str, model: str, worker: str) -> None:
        old = self._sticky.get((pid, model))
        if old is not None and self._held.get(old, 0) > 0:
            self._held[old] -= 1
        self._sticky[(pid, model)] = worker
        self._held[worker] += 1

    def forget(self, pid: str) -> None:
        """`pid` is finished (or no longer ours)."""
        for model in self.cfg.model_names:
            worker = self._sticky.pop((pid, model), None)
            if worker is not None and self._held.get(worker, 0) > 0:
                self._held[worker] -= 1

    def sizes(self) -> dict[str, int]:
        """Problems routed to a worker and their count per worker: 0 when none is open."""
        return {"sticky": len(self._sticky), "held": sum(self._held.values())}

    # -- cleanup --------------------------------------------------------------------
    def drop_dead_queues(self) -> int:
        """Delete the private queues of workers we used that are gone. What waited there
        is re-sent from the coordinator's own records (`InFlight.check`); a message the
        broker restores there later (an unacked task of the dead worker) is a duplicate."""
        dead = [w for w in self._used if w not in self._model_of]
        if not dead:
            return 0
        names = [
            private_queue(self.cfg.namespace, kind, model, w)
            for w in dead
            for model in self.cfg.model_names
            for kind in ("expand", "score")
        ]
        self._used.difference_update(dead)
        return int(self.redis.delete(*names))
