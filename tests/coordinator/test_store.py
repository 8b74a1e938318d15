import json
import time

import pytest

from cord.common.keys import Keys
from cord.common.problems import Problem
from cord.coordinator.store import Store

pytestmark = pytest.mark.redis


def problems(*ids):
    return [Problem(id=i, question=f"q {i}", answer="1") for i in ids]


def test_enqueue_is_idempotent_by_id(redis_client, namespace):
    store = Store(redis_client, Keys(namespace))
    assert store.enqueue(problems("a", "b")) == 2
    assert store.enqueue(problems("b", "c")) == 1
    assert redis_client.lrange(f"{namespace}:queue", 0, -1) == [b"a", b"b", b"c"]
    assert store.counts()["queued"] == 3


def test_claim_lease_takeover_and_finish(redis_client, namespace):
    store = Store(redis_client, Keys(namespace))
    store.enqueue(problems("a", "b", "c"))
    assert store.claim("one", 2, lease_s=30) == ["a", "b"]
    assert store.counts() == {"queued": 1, "in_flight": 2, "done": 0, "failed": 0, "total": 3}
    assert store.take_over("two", 5, lease_s=30) == []  # leases still live
    redis_client.hset(
        f"{namespace}:inflight", "a", json.dumps({"owner": "one", "until": time.time() - 1})
    )
    assert store.take_over("two", 5, lease_s=30) == ["a"]
    assert json.loads(redis_client.hget(f"{namespace}:inflight", "a"))["owner"] == "two"
    store.commit({"a": {"step": 3}})
    assert store.states(["a", "b"]) == [{"step": 3}, None]
    assert store.finish("a") is True
    assert store.finish("a") is False  # already done
    assert store.states(["a"]) == [None]
    assert store.is_finished("a") and not store.is_finished("b")
    store.finish("b", failed=True)
    assert store.counts() == {"queued": 1, "in_flight": 0, "done": 1, "failed": 1, "total": 3}
