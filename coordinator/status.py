"""What `cord-coord status` reports: problems by state, queue depth per pool, live
workers per pool (from the workers' heartbeats in Redis)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys, queue_name
from cord.coordinator.store import Store


def fleet_status(cfg: RunConfig, client: redis.Redis | None = None) -> dict[str, Any]:
    r = client or redis.Redis.from_url(cfg.redis_url)
    keys = Keys(cfg.namespace)
    status: dict[str, Any] = Store(r, keys).counts()
    queues = {}
    for model in cfg.model_names:
        kinds = (["expand"] if model in cfg.teacher_names else []) + (
            ["score"] if model == cfg.meta_prover.name else []
        )
        for kind in kinds:
            name = queue_name(cfg.namespace, kind, model)
            queues[name] = int(r.llen(name))
    status["queues"] = queues
    stale_after = 3 * cfg.reliability.heartbeat_s
    workers: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.model_names}
    now = time.time()
    for name, raw in r.hgetall(keys.workers).items():
        info = json.loads(raw)
        if now - info.get("ts", 0) > stale_after:
            continue
        workers.setdefault(info["model"], []).append(
            {
                "name": name.decode(),
                "tasks_done": info.get("tasks_done", 0),
                "cached_tokens": info.get("engine", {}).get("cached_tokens", 0),
                "prompt_tokens": info.get("engine", {}).get("prompt_tokens", 0),
            }
        )
    status["workers"] = workers
    status["live_workers"] = {m: len(w) for m, w in workers.items()}
    return status
