"""The benchmark harness (ops/bench/): a tiny dispatch run comes out whole and prints its
figures; the doc writer replaces only its own section. Shapes only, never speeds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import ModuleType

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "ops" / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_dispatch_run_brings_every_problem_out(tmp_path, redis_url):
    out = tmp_path / "figures.json"
    args = ["dispatch", "--problems", "20", "--max-in-flight", "10", "--steps", "3"]
    args += ["--redis-url", redis_url, "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(BENCH / "fleet.py"), *args],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["dispatch_done"] == 20 and figures["dispatch_failed"] == 0
    # 3 steps: 3 expansions, then 3 beams x 3 teachers, then 4 x 3 (B = 4), per problem.
    assert figures["dispatch_expand_items"] == 20 * (3 + 9 + 12)
    assert figures["dispatch_tasks_per_s"] > 0 and figures["step_latency_p50_s"] > 0
    assert figures["machine"]["cores"] >= 1
    lines = done.stdout.strip().splitlines()
    assert "=" in lines[-1] and any(x.startswith("dispatch_tasks_per_s=") for x in lines)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_small_backlog_is_enqueued_drawn_from_and_dropped(tmp_path, redis_url):
    out = tmp_path / "figures.json"
    args = ["--problems", "1000", "--admit-seconds", "20", "--redis-url", redis_url]
    done = subprocess.run(
        [sys.executable, str(BENCH / "backlog.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["backlog_problems"] == 1000
    assert figures["enqueue_1m_s"] > 0 and figures["enqueue_rss_mib_1m"] > 0
    assert figures["admit_backlog_done"] > 0 and figures["admit_backlog_steps_per_s"] > 0
    assert done.stdout.strip().splitlines()[-1].split("=")[0] in figures


def test_doc_section_is_replaced_and_the_rest_kept(tmp_path):
    run_all = load("run_all")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## GPU\n\nkept\n", encoding="utf-8")
    run_all.write_doc(doc, "## CPU\n\nfirst")
    run_all.write_doc(doc, "## CPU\n\nsecond")
    text = doc.read_text()
    assert "kept" in text and "second" in text and "first" not in text
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1


def test_name_value_lines_end_with_the_headline_figures():
    run_all = load("run_all")
    figures = {"fleet_overhead_ratio": 0.9, "dispatch_wall_s": 3.0, "dispatch_tasks_per_s": 1500}
    lines = run_all.name_values(figures)
    assert lines == ["dispatch_wall_s=3.0", "dispatch_tasks_per_s=1500", "fleet_overhead_ratio=0.9"]
    rows = run_all.table(figures)
    assert any("`dispatch_tasks_per_s` | 1500 | >= 1000 |  | met" in r for r in rows)


def test_step_labels_follow_the_keys():
    harness = load("harness")
    from cord.common.messages import AnswerItem, ExpandItem, ScoreItem
    from cord.coordinator.search import Work, WorkKey

    def expand(step: int, beam: int) -> Work:
        key = WorkKey("p-1", "x", (step, beam, "a", 0))
        item = ExpandItem(
            key=str(key), prompt="q", steps=[], next_step=1, max_new_tokens=1, temperature=0, seed=0
        )
        return Work("expand", "a", key, item)

    skey = WorkKey("p-1", "s", (2, 0, "a", 0))
    score = Work("score", "m", skey, ScoreItem(key=str(skey), prompt="q", steps=[], answer="1"))
    akey = WorkKey("p-1", "a", (0,))
    answer = Work(
        "answer",
        "a",
        akey,
        AnswerItem(key=str(akey), prompt="q", steps=[], max_new_tokens=1, temperature=0, seed=0),
    )
    assert harness._step_label([expand(3, 0), expand(3, 1)]) == "x3"
    assert harness._step_label([answer, expand(4, 0)]) == "x4"
    assert harness._step_label([answer]) == "a"
    assert harness._step_label([score]) is None


def test_the_step_timer_measures_the_wait_on_a_steps_slowest_candidate(monkeypatch):
    """Step 1 opens at t=0 with three candidates. One ends at its expansion (a twin), two
    at their scores; a step of one candidate has no tail. The last
    candidate ends at 10, the one before at 4: the tail is 6 of a 10 s step, and the
    slowest took 10 s against a mean of (2 + 4 + 10) / 3."""
    harness = load("harness")
    from cord.common.messages import ExpandItem
    from cord.coordinator.search import Work, WorkKey

    clock = {"t": 0.0}
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock["t"])

    def expand(step: int, beam: int) -> Work:
        key = WorkKey("p-1", "x", (step, beam, "a", 0))
        item = ExpandItem(
            key=str(key), prompt="q", steps=[], next_step=1, max_new_tokens=1, temperature=0, seed=0
        )
        return Work("expand", "a", key, item)

    timer = harness.StepTimer(max_in_flight=1)
    timer.queued("p-1", [expand(1, b) for b in range(3)])
    events = [
        (1.0, WorkKey("p-1", "x", (1, 0, "a", 0))),
        (1.5, WorkKey("p-1", "x", (1, 1, "a", 0))),
        (2.0, WorkKey("p-1", "x", (1, 2, "a", 0))),  # a twin: done at its expansion
        (4.0, WorkKey("p-1", "s", (1, 0, "a", 0))),
        (10.0, WorkKey("p-1", "s", (1, 1, "a", 0))),
    ]
    for t, key in events:
        clock["t"] = t
        timer.served("p-1", "m", "w", key)
    timer.queued("p-1", [expand(2, 0)])
    assert timer.tail_s == pytest.approx(6.0) and timer.span_s == pytest.approx(10.0)
    assert timer.slowest_over_mean == [pytest.approx(10.0 / (16.0 / 3))]
    clock["t"] = 12.0
    timer.served("p-1", "m", "w", WorkKey("p-1", "s", (2, 0, "a", 0)))  # one candidate
    timer.queued("p-1", [expand(3, 0)])
    assert timer.tail_s == pytest.approx(6.0)  # a step of one candidate has no tail


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tiny_gpu_cost_run_prices_both_strategies_before_and_after(tmp_path, redis_url):
    """The fleet on simulated GPUs (short traces, a fast clock): every problem comes out
    under both schedulings, streamed replies only where asked, and the figures the
    README quotes are printed."""
    out = tmp_path / "figures.json"
    args = ["gpu", "--problems", "4", "--in-flight", "8", "--sweep", "", "--scale", "0.005"]
    args += ["--trace-tokens", "600,1200", "--no-second-shape", "--no-meta-teacher"]
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "costs.py"),
            *args,
            "--redis-url",
            redis_url,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for suffix in ("", "_before"):
        for strategy in ("cord", "curation"):
            assert figures[f"gpu_done_{strategy}{suffix}"] == 4
            assert figures[f"gpu_failed_{strategy}{suffix}"] == 0
        assert figures[f"gpu_cord_vs_curation_ratio{suffix}"] > 0
        assert figures[f"gpu_cord_vs_curation_ratio_wall{suffix}"] > 0
    assert figures["gpu_partial_replies_cord"] > 0  # items came back as they ended
    assert figures["gpu_partial_replies_cord_before"] == 0  # one reply per task
    assert 0 <= figures["gpu_barrier_idle_share"] <= 1
    assert any(line.startswith("gpu_cord_vs_curation_ratio=") for line in done.stdout.splitlines())
