"""The demo's fresh start: an earlier run's problems, state and queues go, the workers
that registered for this run stay registered and alive."""

import pytest

from cord.common.keys import Keys
from cord.common.messages import Heartbeat
from cord.coordinator.demo import clear_namespace

pytestmark = [pytest.mark.redis]


def test_a_fresh_demo_keeps_the_workers_registered(redis_client, namespace):
    keys = Keys(namespace)
    redis_client.hset(keys.problems, "old", "{}")
    redis_client.hset(keys.state, "old", "{}")
    redis_client.rpush(f"{namespace}.expand.alpha", "stale task")
    redis_client.hset(keys.workers, "alpha-local@h", Heartbeat(model="alpha").model_dump_json())
    redis_client.set(keys.alive("alpha-local@h"), 1, px=60_000)
    clear_namespace(redis_client, namespace)
    assert not redis_client.exists(keys.problems, keys.state, f"{namespace}.expand.alpha")
    assert redis_client.hexists(keys.workers, "alpha-local@h")
    assert redis_client.exists(keys.alive("alpha-local@h"))
