"""CI's short chaos runs (`make chaos` and `make chaos-failover` are the long ones):
workers killed with SIGKILL every few seconds, one SIGTERMed, a coordinator killed once,
and Redis restarted once, or its primary killed once behind Sentinel with two
coordinators running; every problem must come out exactly once, as a valid row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cord.lab.arith import make_problems
from tests.conftest import ROOT

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(1300)
def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path):
    # Faults are timed against --expected-s and a kill comes every --kill-every seconds:
    # both well inside how long the run takes here (about 20 s calm on 2 cores).
    args = ["--problems", "16", "--workers-per-model", "1", "--kill-every", "5"]
    args += ["--sigterms", "1", "--coordinator-kills", "1", "--redis-restarts", "1"]
    args += ["--beam-width", "2", "--thinking-budget", "200", "--no-calm", "--expected-s", "20"]
    args += ["--max-wall-s", "900", "--workdir", str(tmp_path), "--json"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "chaos.py"), *args],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    check = report["check"]
    assert check["missing"] == [] and check["duplicated"] == [] and check["unknown"] == []
    assert check["invalid"] == []
    assert check["traces"] + check["failed"] == 16
    assert report["worker_kills"] >= 1 and report["coordinator_kills"] == 1
    assert report["redis_restarts"] == 1 and report["sigterm_exit_codes"] == [0]
    assert done.returncode == 0


@pytest.mark.timeout(1300)
def test_short_failover_chaos_run_loses_and_duplicates_nothing(tmp_path):
    """The primary SIGKILLed once (the Sentinels promote the replica), one of the two
    coordinators SIGKILLed, workers killed: every problem of the file once, the failover
    counted."""
    problems = tmp_path / "mine.jsonl"
    rows = [p.to_json() for p in make_problems(16, seed=5)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--redis-failover", "--failovers", "1", "--problems", str(problems)]
    args += ["--workers-per-model", "1", "--kill-every", "5", "--sigterms", "1"]
    args += ["--coordinator-kills", "1", "--beam-width", "2", "--thinking-budget", "200"]
    args += ["--no-calm", "--expected-s", "20", "--max-wall-s", "900"]
    args += ["--workdir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "chaos.py"), *args],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = dict(x.split("=", 1) for x in done.stdout.splitlines() if x.startswith("chaos_"))
    assert lines.get("chaos_ok") == "1", done.stdout[-3000:] + done.stderr[-3000:]
    assert lines["chaos_failovers"] == "1" and lines["chaos_coordinator_kills"] == "1"
    assert lines["chaos_lost"] == "0" and lines["chaos_duplicated"] == "0"
    assert "check.traces: " in done.stdout and done.returncode == 0
    assert "problems: 16" in done.stdout
    traces = int(done.stdout.split("check.traces: ")[1].split()[0])
    failed = int(done.stdout.split("check.failed: ")[1].split()[0])
    assert traces + failed == 16
