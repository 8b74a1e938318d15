"""Work in flight against real Redis and real workers: a `--follow` coordinator while the
alpha pool's workers are killed mid-task (SIGKILL) or stopped mid-task (SIGTERM: the
task is handed back), wave after wave. Every problem comes out once, and after each wave
drains every structure the coordinator keeps per task or problem is empty again."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from cord.common.config import load_config
from cord.common.keys import Keys
from cord.coordinator.driver import Coordinator
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.store import Store
from cord.lab.arith import make_problems
from tests.conftest import base_config, local_fleet, write_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WAVES = 3


def wait_running(client: redis.Redis, keys: Keys, worker: str, timeout: float = 60) -> None:
    """Until `worker` has marked a task running (so a kill lands mid-task)."""
    deadline = time.monotonic() + timeout
    while worker.encode() not in client.hvals(keys.running):
        assert time.monotonic() < deadline, f"{worker} ran no task in {timeout}s"
        time.sleep(0.02)


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_follow_with_workers_killed_again_and_again_drains_to_empty(
    tmp_path, redis_url, redis_client, namespace
):
    data = base_config(redis_url, namespace, thinking_budget=200)
    # Lost workers are noticed within 3 s; the spare attempts cover one loss per item.
    data["reliability"] = {
        "task_timeout_s": 120,
        "heartbeat_s": 0.5,
        "worker_lost_s": 3.0,
        "max_attempts": 4,
        "shutdown_grace_s": 0.5,
    }
    config = write_config(tmp_path / "run.yaml", data)
    cfg = load_config(config)
    keys = Keys(namespace)
    fleet = local_fleet(config, tmp_path)
    fleet.up()
    coord = Coordinator(cfg, str(tmp_path / "out"), follow=True)
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    store = Store(redis_client, keys)
    sent: list[str] = []
    try:
        for wave in range(WAVES):
            problems = [Problem(**p.to_json()) for p in make_problems(3, seed=7000 + wave)]
            store.enqueue(problems)
            sent += [p.id for p in problems]
            wait_running(redis_client, keys, fleet.workers[0].node)  # alpha's
            how = signal.SIGKILL if wave % 2 == 0 else signal.SIGTERM
            fleet.replace_worker(0, how)
            deadline = time.monotonic() + 300
            while store.counts()["done"] + store.counts()["failed"] < len(sent):
                assert thread.is_alive(), "the coordinator stopped"
                assert time.monotonic() < deadline, (store.counts(), coord.sizes())
                time.sleep(0.2)
            # The wave drained: nothing of it is left anywhere in the coordinator.
            deadline = time.monotonic() + 10
            while any(coord.sizes().values()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(coord.sizes().values()), (wave, coord.sizes())
    finally:
        coord.stop()
        thread.join(30)
        fleet.stop()
    traces = rows(tmp_path / "out" / "traces.jsonl")
    failed = rows(tmp_path / "out" / "failed.jsonl")
    assert sorted(r["id"] for r in traces + failed) == sorted(sent)  # each once
    assert not failed, [r["reason"] for r in failed]
    assert all(r["strategy"] == "cord" and r["final_answer"] for r in traces)
    counters = coord.counters
    assert counters.redispatched >= 1  # the killed worker's task was sent again
    assert counters.done == len(sent)
