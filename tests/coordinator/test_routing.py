"""Cache-affine routing: the router's choices against a real Redis registry, and the
fleet following them (a problem's work stays on the worker that served it; a worker that
leaves before taking its queued work costs nothing but a re-route)."""

import json
import threading
import time

import pytest
import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys, private_queue, queue_name
from cord.common.messages import Heartbeat
from cord.coordinator.driver import Coordinator, Observer
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.routing import Router
from cord.coordinator.search import WorkKey
from cord.coordinator.store import Store
from cord.lab.arith import make_problems
from tests.conftest import fleet_config, local_fleet

pytestmark = [pytest.mark.redis]


def register(client: redis.Redis, ns: str, worker: str, model: str, ttl_s: int = 60) -> None:
    """What a worker's heartbeat writes (workers/tasks.py): its record and liveness key."""
    keys = Keys(ns)
    client.hset(keys.workers, worker, Heartbeat(model=model, ts=time.time()).model_dump_json())
    client.set(keys.alive(worker), 1, ex=ttl_s)


def unregister(client: redis.Redis, ns: str, worker: str) -> None:
    keys = Keys(ns)
    client.hdel(keys.workers, worker)
    client.delete(keys.alive(worker))


def test_new_problems_spread_and_stay(make_config, redis_client, namespace):
    _, cfg = make_config()
    for w, m in (("a1", "alpha"), ("a2", "alpha"), ("m1", "meta")):
        register(redis_client, namespace, w, m)
    router = Router(cfg, redis_client, Keys(namespace))
    assert router.refresh(0.0) == set()
    first = {pid: router.route(pid, "expand", "alpha")[1] for pid in ("p1", "p2", "p3", "p4")}
    assert sorted(first.values()) == ["a1", "a1", "a2", "a2"]  # balanced by problems held
    assert router.route("p1", "expand", "alpha") == (
        private_queue(namespace, "expand", "alpha", first["p1"]),
        first["p1"],
    )
    assert router.route("p1", "score", "meta")[1] == "m1"
    # No live worker in a pool: its shared queue, which any later worker takes.
    assert router.route("p1", "expand", "beta") == (queue_name(namespace, "expand", "beta"), None)
    # The worker that actually served a problem is where its prefix is cached.
    other = "a2" if first["p1"] == "a1" else "a1"
    router.served("p1", "alpha", other)
    assert router.route("p1", "expand", "alpha")[1] == other


def test_a_gone_worker_loses_its_problems_and_its_queue(make_config, redis_client, namespace):
    _, cfg = make_config()
    register(redis_client, namespace, "a1", "alpha")
    register(redis_client, namespace, "a2", "alpha")
    router = Router(cfg, redis_client, Keys(namespace))
    router.refresh(0.0)
    held = {pid: router.route(pid, "expand", "alpha")[1] for pid in ("p1", "p2")}
    assert set(held.values()) == {"a1", "a2"}
    gone_queue = private_queue(namespace, "expand", "alpha", "a1")
    redis_client.rpush(gone_queue, b"stale message")
    redis_client.delete(Keys(namespace).alive("a1"))  # its liveness key lapsed
    assert router.refresh(1.0) == {"a1"}
    assert all(router.route(pid, "expand", "alpha")[1] == "a2" for pid in held)
    assert router.drop_dead_queues() == 1 and not redis_client.exists(gone_queue)
    # A worker that hands a task back (SIGTERM) gets nothing more, until its name comes
    # back after worker_lost_s (a restarted process under the same name).
    register(redis_client, namespace, "a1", "alpha")
    router.leaving("a2", now=2.0)
    router.refresh(3.0)
    assert router.route("p3", "expand", "alpha")[1] == "a1"
    router.refresh(2.0 + cfg.reliability.worker_lost_s + 1)
    assert router.route("p4", "expand", "alpha")[1] == "a2"


def test_new_problems_go_to_the_least_loaded_and_move_only_past_the_threshold(
    make_config, redis_client, namespace
):
    _, cfg = make_config()
    register(redis_client, namespace, "a1", "alpha")
    register(redis_client, namespace, "a2", "alpha")
    router = Router(cfg, redis_client, Keys(namespace))
    router.refresh(0.0)
    size = cfg.pool("alpha").max_batch * cfg.routing.balance_tasks  # items: the threshold
    load = {"a1": 5, "a2": 0}
    assert router.route("p1", "expand", "alpha", load)[1] == "a2"  # least loaded first
    assert load == {"a1": 5, "a2": 1}  # what is routed counts at once
    assert router.route("p2", "expand", "alpha", load)[1] == "a2"
    assert router.route("p3", "expand", "alpha", load)[1] == "a2"
    # p1 stays on a2 while a2 is within the threshold of a1 ...
    load = {"a1": 0, "a2": int(size)}
    assert router.route("p1", "expand", "alpha", load)[1] == "a2"
    # ... and moves (its prefix is cached nowhere else: one prefill) once it is beyond.
    load = {"a1": 0, "a2": int(size) + 1}
    assert router.route("p1", "expand", "alpha", load)[1] == "a1"
    assert router.route("p1", "expand", "alpha")[1] == "a1"  # and stays there
    assert router.sizes() == {"sticky": 3, "held": 3}


def test_affinity_off_sends_everything_to_the_shared_queue(make_config, redis_client, namespace):
    _, cfg = make_config()
    cfg = cfg.model_copy(update={"routing": cfg.routing.model_copy(update={"affinity": False})})
    register(redis_client, namespace, "a1", "alpha")
    router = Router(cfg, redis_client, Keys(namespace))
    router.refresh(0.0)
    assert router.route("p1", "expand", "alpha") == (queue_name(namespace, "expand", "alpha"), None)


class Recording(Observer):
    """Notes which worker served each problem's items."""

    def __init__(self) -> None:
        self.served_by: list[tuple[str, str, str]] = []  # (problem, model, worker)

    def served(self, pid: str, model: str, worker: str, key: WorkKey) -> None:
        self.served_by.append((pid, model, worker))


@pytest.mark.slow
def test_each_problem_stays_on_one_worker_per_pool(fleet, tmp_path, redis_client):
    """Two alpha workers: two problems, one on each, every step of a problem on its own."""
    config, cfg = fleet_config(fleet, tmp_path / "run.yaml", teachers=("alpha",))
    extra = local_fleet(config, tmp_path)
    extra.start_worker("alpha", slot="alpha-extra")
    try:
        extra.wait_ready()
        problems = [Problem(**p.to_json()) for p in make_problems(2, seed=5150)]
        Store(redis_client, Keys(cfg.namespace)).enqueue(problems)
        recording = Recording()
        summary = Coordinator(cfg, str(tmp_path / "out"), observer=recording).run()
    finally:
        extra.stop()
    assert summary["done"] == 2 and summary["failed"] == 0
    by_problem: dict[tuple[str, str], set[str]] = {}
    for pid, model, worker in recording.served_by:
        by_problem.setdefault((pid, model), set()).add(worker)
    alpha = [by_problem[(p.id, "alpha")] for p in problems]
    assert all(len(w) == 1 for w in alpha), alpha  # sticky
    assert alpha[0] != alpha[1]  # balanced: one problem per alpha worker
    assert all(len(by_problem[(p.id, "meta")]) == 1 for p in problems)
    rows = [json.loads(x) for x in (tmp_path / "out" / "traces.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in problems)


@pytest.mark.slow
def test_work_waiting_for_a_worker_that_left_is_rerouted(fleet, tmp_path, redis_client):
    """A registered worker takes nothing from its own queue and then disappears: the
    problem's work goes to a live worker, no attempt is spent, the row comes out."""
    _, cfg = fleet_config(fleet, tmp_path / "run.yaml", teachers=("alpha",))
    ns = cfg.namespace
    ghost = "a-ghost@test"  # sorts before alpha-0@test: the first problem goes to it
    register(redis_client, ns, ghost, "alpha")
    ghost_queue = private_queue(ns, "expand", "alpha", ghost)
    (problem,) = [Problem(**p.to_json()) for p in make_problems(1, seed=9090)]
    Store(redis_client, Keys(ns)).enqueue([problem])
    cfg = strict_attempts(cfg)
    coord = Coordinator(cfg, str(tmp_path / "out"))
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not redis_client.llen(ghost_queue) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.llen(ghost_queue) == 1, "nothing was routed to the ghost"
        unregister(redis_client, ns, ghost)  # gone before taking it
        thread.join(120)
    finally:
        unregister(redis_client, ns, ghost)
        coord.stop()
    assert not thread.is_alive()
    assert coord.counters.rerouted >= 1 and coord.counters.redispatched == 0
    assert coord.counters.done == 1 and coord.counters.failed == 0
    assert not redis_client.exists(ghost_queue)


def strict_attempts(cfg: RunConfig) -> RunConfig:
    """One attempt per item: a re-route that spent one would fail the problem."""
    rel = cfg.reliability.model_copy(update={"max_attempts": 1})
    return cfg.model_copy(update={"reliability": rel})
