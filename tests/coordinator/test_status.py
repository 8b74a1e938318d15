"""`cord-coord status` pieces on a real Redis: finish times recorded by the store, the
ETA from the recent completion rate, queue depth over shared and private queues, and
liveness by key. (The whole status after a real run: tests/test_monitoring.py.)"""

from __future__ import annotations

import pytest

from cord.common.keys import Keys, listening
from cord.common.messages import Heartbeat, TokenCounts
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.status import completion_eta, fleet_status, format_status
from cord.coordinator.store import Store

pytestmark = pytest.mark.redis


def test_finish_records_when_each_problem_finished(redis_client, namespace):
    keys = Keys(namespace)
    store = Store(redis_client, keys)
    store.enqueue([Problem(id=f"p{i}", question="q", answer="1") for i in range(3)])
    store.claim("c", 3, 30)
    assert store.finish("p0") and store.finish("p1", failed=True)
    assert not store.finish("p0")  # again: not a second completion
    stamps = dict(redis_client.zrange(keys.finished_at, 0, -1, withscores=True))
    assert set(stamps) == {b"p0", b"p1"}


def test_eta_follows_the_recent_completion_rate(redis_client, namespace):
    keys = Keys(namespace)
    now = 1_000_000.0
    redis_client.zadd(keys.finished_at, {"a": now - 400, "b": now - 120, "c": now - 60, "d": now})
    # b, c, d are inside the five-minute window: 2 more completions in the 120 s after b.
    assert completion_eta(redis_client, keys, remaining=4, now=now) == {
        "per_min": 1.0,
        "eta_s": 240.0,
    }
    # Nothing finished in the last five minutes: no rate, no ETA; nothing left: ETA 0.
    assert completion_eta(redis_client, keys, remaining=4, now=now + 1000)["eta_s"] is None
    assert completion_eta(redis_client, keys, remaining=0, now=now + 1000)["eta_s"] == 0.0


def test_queues_and_liveness(redis_client, namespace, make_config):
    _, cfg = make_config()
    keys = Keys(namespace)
    # Two tasks on alpha's shared queue, one on a worker's private queue beside it.
    redis_client.rpush(f"{namespace}.expand.alpha", "t1", "t2")
    redis_client.rpush(f"{namespace}.expand.alpha.w.alpha-1@h", "t3")
    redis_client.rpush(f"{namespace}.expand.alphabet", "not alpha's")
    record = Heartbeat(
        model="alpha", tokens_per_s_1m=12.5, tokens=TokenCounts(prompt=100, cached=40)
    ).model_dump_json()
    redis_client.hset(keys.workers, "alpha-1@h", record)
    redis_client.set(keys.alive("alpha-1@h"), 1, px=10_000)
    # A heartbeat record whose liveness key is gone is a dead worker.
    redis_client.hset(keys.workers, "alpha-2@h", record)
    st = fleet_status(cfg, redis_client)
    assert st["queue_depth"] == {"alpha": 3, "beta": 0, "gamma": 0, "meta": 0}
    assert st["queues"][f"{namespace}.expand.alpha.w.alpha-1@h"] == 1
    assert st["live_workers"] == {"alpha": 1, "beta": 0, "gamma": 0, "meta": 0}
    assert st["tokens_per_s_1m"]["alpha"] == 12.5
    assert st["cache_hit_share"] == 0.4
    text = format_status(st, cfg.redis_url)
    assert "ETA: nothing queued" in text and "workers alpha: alpha-1@h" in text
    Store(redis_client, keys).enqueue([Problem(id="p", question="q", answer="1")])
    # Work and no coordinator: no ETA, and what to run; with one listening: no rate yet.
    text = format_status(fleet_status(cfg, redis_client), cfg.redis_url)
    assert "coordinators running: none" in text and "ETA: none while no coordinator" in text
    redis_client.set(listening(keys.replies("c1")), "host-1-c1", px=10_000)
    text = format_status(fleet_status(cfg, redis_client), cfg.redis_url)
    assert "coordinators running: host-1-c1 (0 problems)" in text and "ETA: unknown" in text


def test_problems_whose_coordinator_is_gone_are_counted_apart(redis_client, namespace, make_config):
    _, cfg = make_config()
    keys = Keys(namespace)
    store = Store(redis_client, keys)
    store.enqueue([Problem(id=f"p{i}", question=f"q{i}", answer="1") for i in range(3)])
    assert len(store.claim("live-c", 2, lease_s=60)) == 2
    dead = store.claim("dead-c", 1, lease_s=60)
    store.release("dead-c", dead)  # its lease runs out at once
    st = fleet_status(cfg, redis_client)
    assert st["in_flight"] == 3 and st["orphaned"] == 1
    assert st["coordinators"] == {"live-c": 2}
    assert "1 problem(s) in flight wait for a coordinator" in format_status(st, cfg.redis_url)
