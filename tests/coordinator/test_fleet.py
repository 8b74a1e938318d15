"""The local fleet: a namespace wiped with or without its workers' records, and a worker
that dies while loading named with the end of its log."""

import pytest

from cord.common.keys import Keys
from cord.common.messages import Heartbeat
from cord.coordinator.fleet import FleetError, wipe_namespace
from tests.conftest import MODELS, base_config, local_fleet, write_config

pytestmark = [pytest.mark.redis]


def plant(client, namespace: str) -> Keys:
    """What a run leaves: problems, state, a queued task, a registered live worker and
    kombu's binding of its queue."""
    keys = Keys(namespace)
    client.hset(keys.problems, "old", "{}")
    client.hset(keys.state, "old", "{}")
    client.rpush(f"{namespace}.expand.alpha", "stale task")
    client.hset(keys.workers, "alpha-0@h", Heartbeat(model="alpha").model_dump_json())
    client.set(keys.alive("alpha-0@h"), 1, px=60_000)
    client.sadd(f"_kombu.binding.{namespace}.expand.alpha", "binding")
    return keys


def test_a_fresh_demo_keeps_the_workers_registered(redis_client, namespace):
    keys = plant(redis_client, namespace)
    wipe_namespace(redis_client, keys, keep_workers=True)
    assert not redis_client.exists(keys.problems, keys.state, f"{namespace}.expand.alpha")
    assert redis_client.hexists(keys.workers, "alpha-0@h")
    assert redis_client.exists(keys.alive("alpha-0@h"))
    assert redis_client.exists(f"_kombu.binding.{namespace}.expand.alpha")  # workers use it


def test_a_full_wipe_leaves_nothing_of_the_namespace(redis_client, namespace):
    keys = plant(redis_client, namespace)
    other = plant(redis_client, f"{namespace}x")  # a namespace that shares its prefix
    assert wipe_namespace(redis_client, keys) == 6  # every key `plant` wrote
    for pattern in keys.patterns():
        assert not list(redis_client.scan_iter(match=pattern)), pattern
    assert redis_client.hexists(other.workers, "alpha-0@h")  # the other one is untouched
    wipe_namespace(redis_client, other)


@pytest.mark.slow
def test_a_worker_that_dies_while_loading_is_named_with_its_log(tmp_path, redis_url, namespace):
    data = base_config(redis_url, namespace, teachers=("alpha",))
    data["meta_prover"] = {"name": "meta", "model": str(MODELS / "no-such-model")}
    config = write_config(tmp_path / "run.yaml", data)
    with local_fleet(config, tmp_path) as fleet, pytest.raises(FleetError) as err:
        fleet.up(timeout_s=120)
    message = str(err.value)
    assert message.startswith("worker meta-0@test exited while loading:")
    assert "no-such-model" in message  # the end of its log says why
    assert not any(w.alive() for w in fleet.workers)  # and the rest are stopped
