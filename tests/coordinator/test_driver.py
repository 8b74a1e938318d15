"""The coordinator against a live fleet: committed state in Redis after every step, and
a coordinator killed mid-run whose problems another one resumes without a duplicate."""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
import yaml

from cord.common.config import load_config
from cord.common.keys import Keys, listening, queue_name
from cord.coordinator.driver import Coordinator
from cord.coordinator.inputs.intake import enqueue_file
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.output import JsonlWriter
from cord.coordinator.store import Store
from cord.lab.arith import make_problems
from tests.conftest import base_config, wait_for, write_config
from tests.coordinator.conftest import failure_row, trace_row

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_killed_coordinator_is_resumed_from_committed_state(fleet, tmp_path, redis_client):
    """A coordinator SIGKILLed mid-run, then another one: the problems resume from their
    committed states, each comes out once. One long test: the kill, the takeover and the
    rows are one story on one run."""
    fleet_config, _ = fleet
    data = yaml.safe_load(fleet_config.read_text())
    data["reliability"]["lease_s"] = 2.0
    data["search"]["thinking_budget"] = 160  # several steps per problem
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    ns = cfg.namespace
    problems = make_problems(6, seed=777)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
    assert enqueue_file(cfg, path).added == 6
    out = tmp_path / "out"

    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cord.coordinator.cli",
            "run",
            "--config",
            str(config),
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline and state is None:
            for raw in redis_client.hvals(f"{ns}:state"):
                candidate = json.loads(raw)
                if candidate["step"] >= 2 and candidate["beams"]:
                    state = candidate
                    break
            time.sleep(0.005)
        assert state is not None, "no committed state seen in Redis"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # The committed state is the beam after the last selected step.
    assert len(state["beams"]) + len(state["completed"]) <= 2
    assert all(len(b["steps"]) == state["step"] - 1 for b in state["beams"])
    assert all(s["teacher"] in cfg.teacher_names for b in state["beams"] for s in b["steps"])
    in_flight = redis_client.hlen(f"{ns}:inflight")
    assert in_flight >= 1

    summary = Coordinator(cfg, str(out)).run()
    assert summary["resumed"] == in_flight
    rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(p.id for p in problems)  # each exactly once
    assert redis_client.hlen(f"{ns}:inflight") == 0 and redis_client.hlen(f"{ns}:state") == 0
    # The killed coordinator's reply stream is still there (late results land in it), but
    # it expires: nothing it leaves behind lives for good. The second deleted its own.
    left = redis_client.keys(f"{ns}:replies:*")
    assert left and all(0 < redis_client.pttl(key) <= 600_000 for key in left)


def take_message(client, queue: str) -> tuple[str, dict] | None:
    """Pop one Celery message as a worker would: (task id, the TaskRequest JSON)."""
    raw = client.lpop(queue)
    if raw is None:
        return None
    message = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return message["headers"]["id"], args[0]


def test_lost_tasks_are_found_and_a_poison_task_is_not_retried_for_ever(
    make_config, tmp_path, redis_client
):
    """No worker answers here; the test plays the broker's two ways of losing a task.
    Attempt 1 vanishes (taken from the queue, never run: a lost message); attempt 2 is
    taken by a worker that dies (its running mark stays, its liveness key never comes).
    With max_attempts 2 the problem then fails with the reason, instead of looping."""
    _, cfg = make_config()
    cfg = cfg.model_copy(
        update={
            "teachers": cfg.teachers[:1],
            "reliability": cfg.reliability.model_copy(
                update={"max_attempts": 2, "worker_lost_s": 2.0}
            ),
        }
    )
    keys = Keys(cfg.namespace)
    Store(redis_client, keys).enqueue(
        [Problem(**p.to_json()) for p in make_problems(1, seed=31337)]
    )
    coordinator = Coordinator(cfg, str(tmp_path / "out"))
    thread = threading.Thread(target=coordinator.run, daemon=True)
    thread.start()
    queue = queue_name(cfg.namespace, "expand", "alpha")
    attempts: list[int] = []
    deadline = time.monotonic() + 60
    while thread.is_alive() and time.monotonic() < deadline:
        taken = take_message(redis_client, queue)
        if taken is None:
            time.sleep(0.05)
            continue
        task_id, request = taken
        attempts.append(request["attempt"])
        if request["attempt"] == 2:
            redis_client.hset(keys.running, task_id, "ghost@test")
    thread.join(5)
    assert not thread.is_alive()
    assert attempts == [1, 2]
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "failed.jsonl").read_text().splitlines()]
    assert "failed after 2 attempt(s)" in row["reason"]
    assert "worker ghost@test was lost while running the task" in row["reason"]
    assert coordinator.counters.redispatched == 1
    assert (tmp_path / "out" / "traces.jsonl").read_text() == ""  # no trace, only the failure
    # The lost and the poison task left nothing behind in the coordinator.
    assert not any(coordinator.sizes().values()), coordinator.sizes()


def _follow(cfg, out) -> tuple[Coordinator, threading.Thread, dict]:
    """A `--follow` coordinator in a thread, started (its listening key is set)."""
    coord = Coordinator(cfg, str(out), follow=True)
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(coord.run()), daemon=True)
    thread.start()
    wait_for(lambda: coord.redis.exists(listening(coord.reply)) == 1, 30, "the coordinator")
    return coord, thread, summary


def test_a_problem_whose_row_is_on_disk_is_closed_not_run_again(make_config, tmp_path):
    """The row came first (another coordinator on the folder wrote it; Redis lost the done
    mark): the problem, queued again, is marked done at admission, and nothing is sent."""
    _, cfg = make_config()
    out = tmp_path / "out"
    coord, thread, summary = _follow(cfg, out)
    try:
        JsonlWriter(out).write_once(failure_row("p1"))
        problem = Problem(id="p1", question="2+2?", answer="4")
        assert Store(coord.redis, coord.keys).enqueue([problem]) == 1
        wait_for(lambda: coord.store.is_finished("p1"), 30, "p1 closed")
    finally:
        coord.stop()
        thread.join(30)
    assert coord.redis.sismember(coord.keys.failed, "p1")  # as the row on disk says
    assert summary["reconciled"] == 1 and summary["tasks_sent"] == 0
    assert (out / "failed.jsonl").read_text().count('"p1"') == 1
    assert (out / "traces.jsonl").read_text() == ""


def test_after_a_failover_the_rows_on_disk_are_marked_done_again(sentinel_group, tmp_path):
    """A row on disk whose done mark is not in Redis (as when the old primary acknowledged
    it and died before its replica had it): when the Sentinels promote the replica, the
    coordinator on the Sentinel URL follows it, sees another server, and marks the row
    done there."""
    data = base_config(sentinel_group.url, f"test-{os.getpid()}")
    data["reliability"] = {"lease_s": 3.0}
    cfg = load_config(write_config(tmp_path / "run.yaml", data))
    out = tmp_path / "out"
    coord, thread, summary = _follow(cfg, out)
    try:
        # Held by another, live coordinator: this one neither takes it over nor runs it.
        lease = json.dumps({"owner": "other", "until": time.time() + 600})
        coord.redis.hset(coord.keys.inflight, "p2", lease)
        assert coord.redis.wait(1, 5000) == 1
        JsonlWriter(out).write_once(trace_row("p2"))
        time.sleep(2 * cfg.reliability.lease_s / 3)  # a renewal: same server, nothing done
        assert not coord.store.is_finished("p2")
        old = sentinel_group.kill_primary()
        sentinel_group.wait_failover(old)
        wait_for(lambda: _done(coord, "p2"), 60, "p2 marked done on the new primary")
    finally:
        coord.stop()
        thread.join(30)
        sentinel_group.restart(old)
        sentinel_group.wait_ready()
    assert summary["reconciled"] == 1 and summary["tasks_sent"] == 0


def _done(coord: Coordinator, pid: str) -> bool:
    try:
        return bool(coord.redis.sismember(coord.keys.done, pid))
    except redis.ConnectionError:
        return False
