"""CI's short chaos run (`make chaos` is the long one): workers killed with SIGKILL
every few seconds, one SIGTERMed, the coordinator killed once, Redis restarted once;
every problem must come out exactly once, as a valid row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
