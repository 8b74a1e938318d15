import json
import time

import pytest

from cord.common.keys import Keys
from cord.coordinator.inputs.problems import Problem
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


def test_renew_keeps_only_our_leases(redis_client, namespace):
    """A coordinator that could not renew in time finds the problem taken over: its
    renewal leaves the new owner's lease alone and reports the problem lost."""
    store = Store(redis_client, Keys(namespace))
    store.enqueue(problems("a", "b", "c"))
    assert store.claim("one", 3, lease_s=30) == ["a", "b", "c"]
    redis_client.hset(
        f"{namespace}:inflight", "a", json.dumps({"owner": "one", "until": time.time() - 1})
    )
    assert store.take_over("two", 5, lease_s=30) == ["a"]
    store.finish("c")
    assert store.renew("one", ["a", "b", "c"], lease_s=30) == ["a", "c"]
    assert json.loads(redis_client.hget(f"{namespace}:inflight", "a"))["owner"] == "two"
    lease_b = json.loads(redis_client.hget(f"{namespace}:inflight", "b"))
    assert lease_b["owner"] == "one" and lease_b["until"] > time.time() + 25
    assert not redis_client.hexists(f"{namespace}:inflight", "c")  # renewal resurrects nothing


def test_own_expired_lease_can_be_taken_back(redis_client, namespace):
    """A claim whose reply was lost leaves a lease nobody renews; its owner takes it
    back when it expires instead of holding it for ever."""
    store = Store(redis_client, Keys(namespace))
    store.enqueue(problems("a"))
    store.claim("one", 1, lease_s=30)
    assert store.take_over("one", 5, lease_s=30) == []
    redis_client.hset(
        f"{namespace}:inflight", "a", json.dumps({"owner": "one", "until": time.time() - 1})
    )
    assert store.take_over("one", 5, lease_s=30) == ["a"]
