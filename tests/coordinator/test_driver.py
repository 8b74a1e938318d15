"""The coordinator against a live fleet: committed state in Redis after every step, and
a coordinator killed mid-run whose problems another one resumes without a duplicate."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cord.common.config import load_config
from cord.common.lab.arith import make_problems
from cord.coordinator.driver import Coordinator
from cord.coordinator.intake import enqueue_file

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_killed_coordinator_is_resumed_from_committed_state(fleet, tmp_path, redis_client):
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
    assert all(s["teacher"] in {"alpha", "beta"} for b in state["beams"] for s in b["steps"])
    in_flight = redis_client.hlen(f"{ns}:inflight")
    assert in_flight >= 1

    summary = Coordinator(cfg, str(out)).run()
    assert summary["resumed"] == in_flight
    rows = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(p.id for p in problems)  # each exactly once
    assert redis_client.hlen(f"{ns}:inflight") == 0 and redis_client.hlen(f"{ns}:state") == 0
