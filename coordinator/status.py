"""What `cord-coord status` reports for one run (a namespace): problems queued / in
flight / done / failed, queue depth per pool, live workers per pool, generated tokens
per second per pool over the last minute, the prefix-cache hit share, an ETA, the
coordinators running (each with the problems it holds: a coordinator is running while
its `keys.listening` key lives) and the problems in flight whose coordinator is gone
(their lease ran out: the next `cord-coord run` resumes them).

Everything is read from Redis: the coordinator's keys, the Celery queues (each pool's
shared queue and its workers' private ones), the workers' heartbeat records (which carry
their token counts and rates) and their liveness keys. A worker is live while its
liveness key exists, so no clocks are compared across hosts.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys
from cord.common.messages import Heartbeat
from cord.common.metrics import hit_share
from cord.common.redisconn import connect, redact_url
from cord.coordinator.store import Store

# The completion rate behind the ETA is measured over this many recent seconds.
RATE_WINDOW_S = 300.0


def queue_depths(r: redis.Redis, cfg: RunConfig) -> dict[str, dict[str, int]]:
    """Messages waiting, per pool and queue: each shared queue and every worker's
    private ``<shared>.w.<worker>`` queue beside it (cache-affine routing)."""
    depths: dict[str, dict[str, int]] = {}
    for model in cfg.model_names:
        queues = cfg.pool_queues(model)
        names = list(queues)
        for q in queues:
            names += sorted(
                k.decode() for k in r.scan_iter(match=f"{q}.w.*", count=1000, _type="list")
            )
        pipe = r.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        depths[model] = {n: int(d) for n, d in zip(names, pipe.execute(), strict=True)}
    return depths


def live_workers(r: redis.Redis, cfg: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """Per pool, the workers whose liveness key exists, with their heartbeat figures."""
    keys = Keys(cfg.namespace)
    records = [
        (n.decode(), Heartbeat.model_validate_json(raw))
        for n, raw in r.hgetall(keys.workers).items()
    ]
    pipe = r.pipeline(transaction=False)
    for name, _ in records:
        pipe.exists(keys.alive(name))
    alive = pipe.execute()
    workers: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.model_names}
    for (name, beat), is_alive in zip(records, alive, strict=True):
        if not is_alive:
            continue
        workers.setdefault(beat.model, []).append(
            {
                "name": name,
                "host": beat.host,
                "tasks_done": beat.tasks_done,
                "tokens_per_s_1m": beat.tokens_per_s_1m,
                "scored_tokens_per_s_1m": beat.scored_tokens_per_s_1m,
                "prompt_tokens": beat.tokens.prompt,
                "cached_tokens": beat.tokens.cached,
                "metrics_port": beat.metrics_port,
            }
        )
    return workers


def completion_eta(
    r: redis.Redis, keys: Keys, remaining: int, now: float | None = None
) -> dict[str, float | None]:
    """Problems finished per minute over the last `RATE_WINDOW_S` seconds, and the
    seconds left at that rate. With fewer than two recent completions there is no rate
    and no ETA (unless nothing remains: then the ETA is 0)."""
    now = time.time() if now is None else now
    recent = r.zrangebyscore(keys.finished_at, now - RATE_WINDOW_S, "+inf", withscores=True)
    stamps = [stamp for _, stamp in recent]
    rate = None
    if len(stamps) >= 2 and now > stamps[0]:
        # From the first recent completion to now, not to the last: a stall lowers it.
        rate = (len(stamps) - 1) / (now - stamps[0])
    if remaining == 0:
        eta: float | None = 0.0
    else:
        eta = remaining / rate if rate else None
    return {
        "per_min": None if rate is None else round(rate * 60, 3),
        "eta_s": None if eta is None else round(eta, 1),
    }


def coordinators(r: redis.Redis, keys: Keys) -> tuple[dict[str, int], int]:
    """The coordinators running, each with the problems it holds (those listening for
    results, and any other still holding leases), and the problems in flight whose
    coordinator is gone."""
    held, orphaned = Store(r, keys).holders()
    found = list(r.scan_iter(match=keys.listening_pattern))
    listening = {v.decode() for v in r.mget(found) if v is not None} if found else set()
    return {c: held.get(c, 0) for c in sorted(listening | set(held))}, orphaned


def fleet_status(cfg: RunConfig, client: redis.Redis | None = None) -> dict[str, Any]:
    r = client or connect(cfg.redis_url)
    keys = Keys(cfg.namespace)
    status: dict[str, Any] = {"namespace": cfg.namespace, **Store(r, keys).counts()}
    status["coordinators"], status["orphaned"] = coordinators(r, keys)
    depths = queue_depths(r, cfg)
    status["queues"] = {q: n for per in depths.values() for q, n in per.items()}
    status["queue_depth"] = {m: sum(per.values()) for m, per in depths.items()}
    workers = live_workers(r, cfg)
    status["workers"] = workers
    status["live_workers"] = {m: len(ws) for m, ws in workers.items()}
    status["tokens_per_s_1m"] = {
        m: round(sum(w["tokens_per_s_1m"] for w in ws), 3) for m, ws in workers.items()
    }
    status["scored_tokens_per_s_1m"] = {
        m: round(sum(w["scored_tokens_per_s_1m"] for w in ws), 3) for m, ws in workers.items()
    }
    status["cache_hit_share_by_model"] = {
        m: round(_share(ws), 4) for m, ws in workers.items() if ws
    }
    status["cache_hit_share"] = round(_share([w for ws in workers.values() for w in ws]), 4)
    rate = completion_eta(r, keys, status["queued"] + status["in_flight"])
    status["completed_per_min"] = rate["per_min"]
    status["eta_s"] = rate["eta_s"]
    return status


def _share(workers: list[dict[str, Any]]) -> float:
    return hit_share(
        sum(w["cached_tokens"] for w in workers), sum(w["prompt_tokens"] for w in workers)
    )


def format_status(st: dict[str, Any], redis_url: str) -> str:
    """The human view of `fleet_status`: counts, ETA, then one line per pool."""
    lines = [f"namespace {st['namespace']} at {redact_url(redis_url)}"]
    counts = "  ".join(f"{k} {st[k]}" for k in ("queued", "in_flight", "done", "failed"))
    lines.append(f"problems: {counts}  (of {st['total']})")
    coords = st["coordinators"]
    if coords:
        held = ", ".join(f"{c} ({n} problems)" for c, n in coords.items())
        lines.append(f"coordinators running: {held}")
    else:
        lines.append("coordinators running: none")
    if st["orphaned"]:
        lines.append(
            f"{st['orphaned']} problem(s) in flight wait for a coordinator (theirs stopped "
            "or died): `cord-coord run` resumes them"
        )
    if st["queued"] + st["in_flight"] == 0:
        lines.append("ETA: nothing queued or in flight")
    elif not coords:
        lines.append("ETA: none while no coordinator runs (`cord-coord run --config ...`)")
    elif st["eta_s"] is None:
        lines.append("ETA: unknown (fewer than two problems finished in the last 5 min)")
    else:
        rate = st["completed_per_min"]
        per_min = f", {rate:g} problems/min over the last 5 min" if rate is not None else ""
        lines.append(f"ETA: {_duration(st['eta_s'])}{per_min}")
    lines.append(f"cache hit share (live workers): {st['cache_hit_share']:.1%}")
    lines.append(
        f"{'pool':<12} {'live':>4} {'queued':>7} {'gen tok/s':>10} {'scored/s':>9} {'cache':>6}"
    )
    for model, ws in st["workers"].items():
        share = st["cache_hit_share_by_model"].get(model)
        lines.append(
            f"{model:<12} {len(ws):>4} {st['queue_depth'].get(model, 0):>7} "
            f"{st['tokens_per_s_1m'][model]:>10.1f} {st['scored_tokens_per_s_1m'][model]:>9.1f} "
            f"{'-' if share is None else f'{share:.0%}':>6}"
        )
    for model, ws in st["workers"].items():
        if ws:
            lines.append(f"workers {model}: " + ", ".join(w["name"] for w in ws))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
