"""Monitoring against the session's live fleet: one run of two problems, then what
`cord-coord status`, the coordinator's and the workers' Prometheus endpoints, and Flower
(its API and its dashboard in headless Chromium) say about it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cord.common.celery_app import make_celery
from cord.common.config import RunConfig
from cord.common.keys import Keys, queue_name
from cord.common.metrics import free_port
from cord.coordinator.driver import Coordinator
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.metrics import serve_coordinator
from cord.coordinator.status import fleet_status
from cord.coordinator.store import Store
from cord.lab.arith import make_problems
from tests.conftest import chromium, needs_chromium

pytestmark = [pytest.mark.redis, pytest.mark.slow]
POOLS = ("alpha", "beta", "gamma", "meta")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def worker_ports(client: redis.Redis, cfg: RunConfig) -> dict[str, int]:
    """Each pool's metrics port, as its worker's heartbeat names it."""
    ports = {}
    for raw in client.hvals(Keys(cfg.namespace).workers):
        info = json.loads(raw)
        ports[info["model"]] = info["metrics_port"]
    assert set(ports) == set(POOLS) and all(isinstance(p, int) for p in ports.values())
    return ports


def worker_figures(ports: dict[str, int]) -> dict[str, dict[str, float]]:
    out = {}
    for model, port in ports.items():
        s = scrape(port)
        out[model] = {
            "tasks": value(s, "cord_worker_tasks_total", model=model),
            "generated": value(s, "cord_worker_tokens_total", model=model, kind="generated"),
            "scored": value(s, "cord_worker_tokens_total", model=model, kind="scored"),
            "latency_count": sum(
                v
                for (name, labels), v in s.items()
                if name == "cord_worker_task_seconds_count" and ("model", model) in labels
            ),
        }
    return out


@pytest.fixture(scope="module")
def finished_run(
    fleet: tuple[Path, RunConfig], redis_client: redis.Redis, tmp_path_factory: Any
) -> dict[str, Any]:
    """Two problems through the fleet by an in-process coordinator whose metrics are
    served on a free port; figures taken before and after."""
    _, cfg = fleet
    ports = worker_ports(redis_client, cfg)
    tag = uuid.uuid4().hex[:6]
    problems = [
        Problem(**{**p.to_json(), "id": f"mon-{tag}-{i}"})
        for i, p in enumerate(make_problems(2, seed=6060))
    ]
    before = {"status": fleet_status(cfg, redis_client), "workers": worker_figures(ports)}
    assert Store(redis_client, Keys(cfg.namespace)).enqueue(problems) == 2
    out = tmp_path_factory.mktemp("monitoring")
    coord = Coordinator(cfg, str(out))
    server = serve_coordinator(coord, 0)
    try:
        summary = coord.run()
        coord_metrics = scrape(server.port)
    finally:
        server.close()
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    # A task the coordinator no longer needed may still be finishing on a worker.
    deadline = time.monotonic() + 30
    while True:
        after = worker_figures(ports)
        tasks = sum(after[m]["tasks"] - before["workers"][m]["tasks"] for m in POOLS)
        if tasks >= summary["tasks_sent"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {
        "cfg": cfg,
        "before": before,
        "workers_after": after,
        "summary": summary,
        "coord_metrics": coord_metrics,
        "rows": rows,
    }


def test_status_reports_the_run(finished_run, redis_client):
    cfg, before = finished_run["cfg"], finished_run["before"]["status"]
    # Workers publish their rates with each heartbeat (every second here).
    deadline = time.monotonic() + 10
    while True:
        st = fleet_status(cfg, redis_client)
        rates = st["tokens_per_s_1m"]
        if all(rates[t] > 0 for t in ("alpha", "beta", "gamma")) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st["done"] == before["done"] + 2 and st["failed"] == before["failed"]
    assert st["queued"] == 0 and st["in_flight"] == 0
    assert st["live_workers"] == dict.fromkeys(POOLS, 1)
    assert st["queue_depth"] == dict.fromkeys(POOLS, 0)
    assert all(rates[t] > 0 for t in ("alpha", "beta", "gamma")), rates
    assert rates["meta"] == 0 and st["scored_tokens_per_s_1m"]["meta"] > 0
    assert 0 < st["cache_hit_share"] <= 1
    assert all(0 <= s <= 1 for s in st["cache_hit_share_by_model"].values())
    # Nothing left: the ETA is zero, and two completions within five minutes give a rate.
    assert st["eta_s"] == 0.0 and st["completed_per_min"] > 0


def test_coordinator_metrics_match_the_run(finished_run):
    m, summary, rows = finished_run["coord_metrics"], finished_run["summary"], finished_run["rows"]
    assert value(m, "cord_coord_problems_total", outcome="done") == 2 == len(rows)
    assert value(m, "cord_coord_problems_total", outcome="failed") == 0
    assert value(m, "cord_coord_tasks_sent_total") == summary["tasks_sent"] > 0
    for kind, n in summary["by_kind"].items():
        assert value(m, "cord_coord_items_sent_total", kind=kind) == n
    # Every kept trajectory grows by one step per committed step of its problem.
    assert value(m, "cord_coord_steps_total") >= sum(len(r["steps"]) for r in rows) >= 2
    assert value(m, "cord_coord_problems_driving") == 0
    assert value(m, "cord_problems", state="queued") == 0
    for model in POOLS:
        assert value(m, "cord_queue_depth", model=model) == 0


def test_run_logs_json_progress_off_a_tty(fleet, redis_client, tmp_path):
    config, cfg = fleet
    (problem,) = make_problems(1, seed=6161)
    pid = f"mon-log-{uuid.uuid4().hex[:6]}"
    Store(redis_client, Keys(cfg.namespace)).enqueue([Problem(**{**problem.to_json(), "id": pid})])
    args = ["run", "--config", str(config), "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "cord.coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # stderr is a pipe: every line is a JSON object, and each closed problem has one.
    events = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress == [
        {
            **progress[0],
            "problem_id": pid,
            "outcome": "done",
            "done": 1,
            "failed": 0,
            "queued": 0,
            "in_flight": 0,
        }
    ]
    assert "timestamp" in progress[0] and progress[0]["level"] == "info"


def test_worker_metrics_count_the_run(finished_run):
    before, after = finished_run["before"]["workers"], finished_run["workers_after"]
    summary, rows = finished_run["summary"], finished_run["rows"]
    # Only this run used the fleet meanwhile: each task it sent was answered once.
    assert sum(after[m]["tasks"] - before[m]["tasks"] for m in POOLS) == summary["tasks_sent"]
    for m in POOLS:
        assert after[m]["latency_count"] - before[m]["latency_count"] == (
            after[m]["tasks"] - before[m]["tasks"]
        )
    generated = sum(after[t]["generated"] - before[t]["generated"] for t in POOLS)
    if summary["late_results"] == 0 and summary["redispatched"] == 0:
        # Each generated token was counted once by a worker and once in a row's stats.
        in_rows = sum(sum(r["stats"]["tokens_by_teacher"].values()) for r in rows)
        assert generated == in_rows
    assert after["meta"]["scored"] > before["meta"]["scored"]


# -- Flower ---------------------------------------------------------------------------
AUTH = ("monitor", uuid.uuid4().hex)


def _get(url: str, auth: tuple[str, str] | None = AUTH) -> tuple[int, Any]:
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            body = resp.read()
            is_json = resp.headers.get_content_type() == "application/json"
            return resp.status, json.loads(body) if is_json else body.decode()
    except urllib.error.HTTPError as e:
        return e.code, None


@contextlib.contextmanager
def running_flower(config: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`cord-coord flower` on the fleet's broker, on a free port, until the block ends
    (SIGTERM); yields its base URL and process."""
    port = free_port()
    env = {**os.environ, "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}
    with log.open("wb") as f:
        args = ["flower", "--config", str(config), "--port", str(port), "--inspect-every", "2"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cord.coordinator.cli", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if _get(f"{base}/healthcheck", auth=None)[0] in (200, 401):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def flower(fleet: tuple[Path, RunConfig], tmp_path_factory: Any) -> Iterator[str]:
    """`cord-coord flower` on the fleet's broker, on a free port; yields its base URL."""
    config, _ = fleet
    with running_flower(config, tmp_path_factory.mktemp("flower") / "flower.log") as (base, _):
        yield base


def fleet_workers() -> set[str]:
    """The session fleet's Celery node names (`tests/conftest.py`'s `local_fleet`: one
    worker per pool, `<pool>-0@test`)."""
    return {f"{model}-0@test" for model in POOLS}


def inspected_workers(flower: str) -> dict[str, Any]:
    """Flower's /api/workers once it has inspected every fleet worker: a worker is listed
    as soon as its first event comes, its queues only after an inspection."""
    deadline = time.monotonic() + 60
    while True:
        code, workers = _get(f"{flower}/api/workers")
        assert code == 200
        if all("active_queues" in workers.get(w, {}) for w in fleet_workers()):
            return workers
        assert time.monotonic() < deadline, {w: sorted(workers.get(w, {})) for w in fleet_workers()}
        time.sleep(0.5)


def test_flower_api_lists_every_pool_and_its_queues(flower, fleet):
    _, cfg = fleet
    workers = inspected_workers(flower)
    for name in fleet_workers():
        queues = {q["name"] for q in workers[name]["active_queues"]}
        model = name.split("-")[0]
        kind = "score" if model == "meta" else "expand"
        assert queue_name(cfg.namespace, kind, model) in queues
    # Queue lengths come from the broker for every queue the workers consume.
    code, lengths = _get(f"{flower}/api/queues/length")
    assert code == 200
    names = {q["name"] for q in lengths["active_queues"]}
    assert {queue_name(cfg.namespace, "expand", t) for t in POOLS[:3]} <= names
    assert queue_name(cfg.namespace, "score", "meta") in names


def test_flower_inspects_again_and_sees_a_new_queue(flower, fleet):
    """Flower alone inspects once, at start; `cord-coord flower` inspects every few
    seconds, so a queue a worker starts consuming later shows up with its length."""
    _, cfg = fleet
    inspected_workers(flower)  # Flower's own inspection at start is over
    probe = f"{cfg.namespace}.monitor-probe-{uuid.uuid4().hex[:6]}"
    control = make_celery(cfg).control
    assert control.add_consumer(probe, destination=["alpha-0@test"], reply=True, timeout=10)
    try:
        deadline = time.monotonic() + 30
        names: set[str] = set()
        while probe not in names and time.monotonic() < deadline:
            time.sleep(1)
            code, lengths = _get(f"{flower}/api/queues/length")
            assert code == 200
            names = {q["name"] for q in lengths["active_queues"]}
        assert probe in names
    finally:
        control.cancel_consumer(probe, destination=["alpha-0@test"], reply=True, timeout=10)


def test_flower_refuses_requests_without_credentials(flower):
    assert _get(f"{flower}/api/workers", auth=None)[0] == 401
    assert _get(f"{flower}/api/workers", auth=(AUTH[0], "wrong"))[0] == 401
    assert _get(f"{flower}/workers", auth=None)[0] == 401


@pytest.mark.browser
@needs_chromium
def test_flower_dashboard_shows_the_workers_in_chromium(flower, tmp_path):
    url = flower.replace("http://", f"http://{AUTH[0]}:{AUTH[1]}@") + "/workers"
    # The dashboard lists workers once their event heartbeats (every 2 s) have arrived.
    deadline = time.monotonic() + 60
    while True:
        dom = chromium(["--dump-dom"], url, tmp_path / "profile").stdout
        if all(name in dom for name in fleet_workers()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(name in dom for name in fleet_workers()), dom[-2000:]
    shot = tmp_path / "flower-workers.png"
    chromium([f"--screenshot={shot}"], url, tmp_path / "profile")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
