"""The task body a worker runs, on a real engine and a real Redis stream."""

from pathlib import Path

import pytest

from cord.common.keys import Keys
from cord.common.messages import Heartbeat, TaskRequest, TaskResult
from cord.common.pools import HFSpec
from cord.workers.engines.hf import HFEngine
from cord.workers.tasks import WorkerRuntime
from tests.conftest import listening_stream

pytestmark = pytest.mark.redis
MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def engine():
    return HFEngine(HFSpec(name="alpha", model=str(MODELS / "alpha")))


def replies(client, stream):
    return [TaskResult.model_validate_json(f[b"data"]) for _, f in client.xrange(stream)]


def test_expand_task_replies_on_the_stream(engine, redis_client, namespace):
    runtime = WorkerRuntime(engine, "w1", redis_client, Keys(namespace), ["q"], reply_ttl_s=90)
    stream = listening_stream(redis_client, f"{namespace}:replies:test")
    req = TaskRequest(
        task_id="t1",
        kind="expand",
        model="alpha",
        reply_to=stream,
        expand=[
            {
                "key": f"k{i}",
                "prompt": "What is 1 + 2?",
                "steps": [],
                "next_step": 1,
                "max_new_tokens": 5,
                "temperature": 0.6,
                "seed": i,
            }
            for i in range(3)
        ],
    )
    runtime.handle("expand", req.model_dump(mode="json"))
    (result,) = replies(redis_client, stream)
    assert result.task_id == "t1" and result.worker == "w1" and result.error is None
    assert [g.key for g in result.generations] == ["k0", "k1", "k2"]
    assert all(1 <= g.tokens <= 5 and g.prompt_tokens > 0 for g in result.generations)
    # The stream expires unless its coordinator keeps renewing: none is left for good.
    assert 80_000 < redis_client.pttl(stream) <= 90_000


def test_wrong_pool_is_a_retryable_error(engine, redis_client, namespace):
    runtime = WorkerRuntime(engine, "w1", redis_client, Keys(namespace), ["q"])
    stream = listening_stream(redis_client, f"{namespace}:replies:test")
    req = TaskRequest(
        task_id="t2",
        kind="score",
        model="meta",
        reply_to=stream,
        score=[{"key": "s", "prompt": "q", "steps": [], "answer": "1"}],
    )
    runtime.handle("score", req.model_dump(mode="json"))
    (result,) = replies(redis_client, stream)
    assert result.retryable and "reached worker of alpha" in (result.error or "")


def test_malformed_message_is_dropped(engine, redis_client, namespace):
    runtime = WorkerRuntime(engine, "w1", redis_client, Keys(namespace), ["q"])
    runtime.handle("expand", {"task_id": "t3", "reply_to": f"{namespace}:replies:test"})
    assert redis_client.xlen(f"{namespace}:replies:test") == 0


def test_heartbeat_registers_the_worker(engine, redis_client, namespace):
    runtime = WorkerRuntime(engine, "w1", redis_client, Keys(namespace), ["q1", "q2"])
    runtime.heartbeat()
    record = Heartbeat.model_validate_json(redis_client.hget(f"{namespace}:workers", "w1"))
    assert record.model == "alpha" and record.queues == ["q1", "q2"]
    assert record.engine.requests == engine.stats().requests
    assert record.engine.cache_entries is not None  # the hf engine's prefix cache
    runtime.deregister()
    assert redis_client.hget(f"{namespace}:workers", "w1") is None


def test_a_streaming_task_replies_per_item_as_items_end(redis_client, namespace):
    """On an engine whose items end apart (the simulated GPU), a task that asks for it
    gets partial replies as items end and a last one with the rest: every item once."""
    from cord.common.pools import model_spec
    from cord.workers.engines.sim import SimEngine

    # A clock slow enough that the items' ends lie tens of milliseconds apart.
    sim = SimEngine(model_spec(name="t", engine="sim", model="qwen2.5-7b", time_scale=0.05))
    runtime = WorkerRuntime(sim, "w1", redis_client, Keys(namespace), ["q"])
    items = [
        {
            "key": f"k{i}",
            "prompt": "What is 1 + 2?",
            "steps": [],
            "next_step": 1,
            "max_new_tokens": 512,
            "temperature": 0.6,
            "seed": i,
        }
        for i in range(6)
    ]
    for stream_flag in (True, False):
        stream = listening_stream(redis_client, f"{namespace}:replies:{stream_flag}")
        req = TaskRequest(
            task_id=f"t{stream_flag}",
            kind="expand",
            model="t",
            reply_to=stream,
            stream=stream_flag,
            expand=items,
        )
        runtime.handle("expand", req.model_dump(mode="json"))
        got = replies(redis_client, stream)
        keys = [g.key for r in got for g in r.generations]
        assert sorted(keys) == [f"k{i}" for i in range(6)]  # each once
        assert [r.partial for r in got] == [True] * (len(got) - 1) + [False]
        if stream_flag:  # step lengths differ: the items end at different passes
            assert len(got) >= 2
        else:
            assert len(got) == 1


def test_a_task_whose_coordinator_is_gone_is_dropped_unrun(engine, redis_client, namespace):
    # Its coordinator stopped (its listening key deleted) or died a lease ago (lapsed):
    # nobody reads the reply. The worker neither runs it nor answers it.
    runtime = WorkerRuntime(engine, "w1", redis_client, Keys(namespace), ["q"])
    stream = f"{namespace}:replies:gone"
    req = TaskRequest(
        task_id="t-gone",
        kind="expand",
        model="alpha",
        reply_to=stream,
        expand=[
            {
                "key": "k0",
                "prompt": "What is 1 + 2?",
                "steps": [],
                "next_step": 1,
                "max_new_tokens": 5,
                "temperature": 0.6,
                "seed": 0,
            }
        ],
    )
    runtime.handle("expand", req.model_dump(mode="json"))
    assert redis_client.exists(stream) == 0
    assert not redis_client.hexists(Keys(namespace).running, "t-gone")
    assert runtime.tasks_done == 0
    # The same task once its coordinator listens: run and answered.
    listening_stream(redis_client, stream)
    runtime.handle("expand", req.model_dump(mode="json"))
    (result,) = replies(redis_client, stream)
    assert [g.key for g in result.generations] == ["k0"] and runtime.tasks_done == 1
