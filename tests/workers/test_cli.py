"""`cord-worker` as a process: SIGTERM (a spot notice) stops it cleanly, a task that
cannot finish within the grace period is handed back, and a pickled message is refused
without being unpickled."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cord.common.celery_app import make_celery
from cord.common.config import load_config
from cord.common.keys import TASK_NAMES, Keys, queue_name
from cord.common.messages import TaskRequest, TaskResult
from cord.lab import tinymodels
from cord.workers.engines.server import request_json
from tests.conftest import MODELS, listening_stream, wait_for, write_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def worker_config(tmp_path: Path, redis_url: str, namespace: str, model: Path) -> Path:
    return write_config(
        tmp_path / "worker.yaml",
        {
            "redis_url": redis_url,
            "namespace": namespace,
            "teachers": [{"name": "t", "model": str(model)}],
            "meta_prover": {"name": "t"},
            "reliability": {"heartbeat_s": 0.5, "worker_lost_s": 2.0, "shutdown_grace_s": 1.5},
        },
    )


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "cord.workers.cli", "--config", str(config), "--pool", "t"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def expand_request(stream: str, items: int, max_new_tokens: int) -> TaskRequest:
    return TaskRequest(
        task_id=uuid.uuid4().hex,
        kind="expand",
        model="t",
        reply_to=stream,
        expand=[
            {
                "key": f"k{i}",
                "prompt": f"What is {i} + 2 + 3?",
                "steps": [],
                "next_step": 1,
                "max_new_tokens": max_new_tokens,
                "temperature": 0.0,
                "seed": i,
                "whole": True,
            }
            for i in range(items)
        ],
    )


def run_until_started(cfg, client, items: int, max_new_tokens: int):
    """Wait for the worker, send it one expand task, return once it runs the task."""
    keys = Keys(cfg.namespace)
    wait_for(lambda: client.hlen(keys.workers) == 1, 120, "the worker")
    stream = listening_stream(client, f"{cfg.namespace}:replies:test")
    req = expand_request(stream, items=items, max_new_tokens=max_new_tokens)
    queue = queue_name(cfg.namespace, "expand", "t")
    make_celery(cfg).send_task(
        TASK_NAMES["expand"], args=[req.model_dump(mode="json")], queue=queue, task_id=req.task_id
    )
    wait_for(lambda: client.hexists(keys.running, req.task_id), 60, "the task to start")
    return stream, req, queue


def replies(client, stream: str) -> list[TaskResult]:
    return [TaskResult.model_validate_json(f[b"data"]) for _, f in client.xrange(stream)]


@pytest.fixture(scope="module")
def wandering_model(tmp_path_factory) -> Path:
    """A random-weight character model whose greedy continuation never closes the
    trajectory, so a task on it runs to its token limit (a long task on demand)."""
    path = tmp_path_factory.mktemp("charlm") / "charlm"
    tinymodels.build(tinymodels.CHAR_SPEC, path, seed=5, text=tinymodels.corpus(50))
    return path


def test_sigterm_hands_back_a_task_that_outlives_the_grace(
    tmp_path, redis_url, redis_client, namespace, wandering_model
):
    config = worker_config(tmp_path, redis_url, namespace, wandering_model)
    cfg = load_config(config)
    keys = Keys(namespace)
    proc = start_worker(config, tmp_path / "worker.log")
    try:
        # 64 rows of 900 tokens: about 6 s on the 2-core machine of 2026-12-06, four times
        # the grace (16 rows took 1.5 s there and finished before it ran out).
        stream, req, queue = run_until_started(cfg, redis_client, items=64, max_new_tokens=900)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "worker.log").read_text()
    (result,) = replies(redis_client, stream)  # the hand-back, and no late result
    assert result.task_id == req.task_id and result.handed_back and result.retryable
    assert result.generations == [] and "handed back" in (result.error or "")
    assert 1.5 <= took < 15, log[-3000:]
    # The message is back in the queue for another worker, and the worker is gone.
    assert redis_client.llen(queue) == 1
    assert not redis_client.hexists(keys.running, req.task_id)
    assert redis_client.hlen(keys.workers) == 0
    assert not list(redis_client.scan_iter(match=keys.alive("*")))


def test_sigterm_lets_a_short_task_finish_and_exits_0(
    tmp_path, redis_url, redis_client, namespace, wandering_model
):
    config = worker_config(tmp_path, redis_url, namespace, wandering_model)
    cfg = load_config(config)
    proc = start_worker(config, tmp_path / "worker.log")
    try:
        # 4 rows of 300 tokens: about 0.4 s on the 2-core machine of 2026-12-06, long
        # enough to be seen running (a task of the lab's alpha could finish between two
        # looks), well inside the 1.5 s grace.
        stream, _req, queue = run_until_started(cfg, redis_client, items=4, max_new_tokens=300)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (result,) = replies(redis_client, stream)
    assert result.error is None and not result.handed_back
    assert [g.key for g in result.generations] == ["k0", "k1", "k2", "k3"]
    assert redis_client.llen(queue) == 0  # acked: nobody runs it again


class Planted:
    """Unpickling this object would create a file: proof that a message was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_a_pickled_message_is_refused_unopened(fleet, tmp_path, redis_client):
    config, cfg = fleet
    marker = tmp_path / "unpickled"
    queue = queue_name(cfg.namespace, "expand", "alpha")
    app = make_celery(cfg)
    app.send_task(TASK_NAMES["expand"], args=[Planted(marker)], queue=queue, serializer="pickle")
    wait_for(lambda: redis_client.llen(queue) == 0, 60, "the worker to take the message")
    # The worker refused it and carries on: a JSON task after it is served.
    stream = listening_stream(redis_client, f"{cfg.namespace}:replies:{uuid.uuid4().hex[:6]}")
    req = expand_request(stream, items=1, max_new_tokens=8)
    req = req.model_copy(update={"model": "alpha"})
    app.send_task(TASK_NAMES["expand"], args=[req.model_dump(mode="json")], queue=queue)
    wait_for(lambda: redis_client.xlen(stream) == 1, 60, "the JSON task's result")
    redis_client.delete(stream)
    assert not marker.exists()
    logs = "".join(p.read_text(errors="replace") for p in (config.parent / "logs").glob("alpha*"))
    assert "ContentDisallowed" in logs or "Refusing to deserialize" in logs


def test_sigterm_while_loading_exits_0(tmp_path, redis_url, redis_client, namespace):
    """A spot notice before the model is loaded: nothing to finish, a clean exit."""
    config = worker_config(tmp_path, redis_url, namespace, MODELS / "alpha")
    proc = start_worker(config, tmp_path / "worker.log")
    log = tmp_path / "worker.log"
    try:
        # Its handler is set before it logs `loading_model`; then it imports torch and
        # loads the model, far from serving. (A fixed 1 s sleep here once signalled a
        # fresh venv's worker before its handler was set: cold imports.)
        wait_for(lambda: "loading_model" in log.read_text(errors="replace"), 60, "loading")
        assert redis_client.hlen(Keys(namespace).workers) == 0
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "SIGTERM before serving" in log.read_text()
    assert redis_client.hlen(Keys(namespace).workers) == 0


def test_a_server_engine_worker_runs_tasks_at_once_and_hands_all_back(
    tmp_path, redis_url, redis_client, namespace
):
    """`concurrency: 2` on a server engine: two tasks run on the worker at the same time
    (its server batches their requests), and a spot notice hands both back."""
    from tests.workers.engines.test_sglang import running_server

    with running_server(tmp_path / "server.log") as url:
        request_json("POST", url + "/test/stall", {"seconds": 60})  # every request waits
        config = write_config(
            tmp_path / "worker.yaml",
            {
                "redis_url": redis_url,
                "namespace": namespace,
                "teachers": [
                    {
                        "name": "t",
                        "model": str(MODELS / "alpha"),
                        "engine": "sglang",
                        "sglang_url": url,
                        "concurrency": 2,
                    }
                ],
                "meta_prover": {"name": "t"},
                "reliability": {"heartbeat_s": 0.5, "worker_lost_s": 2.0, "shutdown_grace_s": 1},
            },
        )
        cfg = load_config(config)
        keys = Keys(namespace)
        proc = start_worker(config, tmp_path / "worker.log")
        try:
            wait_for(lambda: redis_client.hlen(keys.workers) == 1, 120, "the worker")
            stream = listening_stream(redis_client, f"{namespace}:replies:test")
            reqs = [expand_request(stream, items=2, max_new_tokens=8) for _ in range(2)]
            queue = queue_name(namespace, "expand", "t")
            for req in reqs:
                make_celery(cfg).send_task(
                    TASK_NAMES["expand"],
                    args=[req.model_dump(mode="json")],
                    queue=queue,
                    task_id=req.task_id,
                )
            running = lambda: all(redis_client.hexists(keys.running, r.task_id) for r in reqs)  # noqa: E731
            wait_for(running, 60, "both tasks to run at once")
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    results = replies(redis_client, stream)
    assert sorted(r.task_id for r in results) == sorted(r.task_id for r in reqs)
    assert all(r.handed_back and r.retryable and not r.generations for r in results)
    assert redis_client.llen(queue) == 2  # both messages back for another worker
    assert redis_client.hlen(keys.running) == 0


# -- mistakes at start-up: one line, before any model is loaded ------------------------

CHECK = """
import sys
from cord.workers.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except Exception as e:
    print(type(e).__name__ + ": " + e.format_message())
print("transformers imported:", "transformers" in sys.modules)
"""


def _refusal(config: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", CHECK, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_a_model_that_is_not_there_is_named_before_transformers_loads(tmp_path, redis_url):
    config = write_config(
        tmp_path / "run.yaml",
        {
            "redis_url": redis_url,
            "teachers": [
                {"name": "beta", "model": "../models/betaa"},
                {"name": "hub", "model": "nobody/no-such-model"},
            ],
            "meta_prover": {"name": "beta"},
        },
    )
    folder = _refusal(config, "--pool", "beta")
    assert folder[-1] == "transformers imported: False"
    assert folder[0].startswith("UsageError: pool 'beta': no model folder '../models/betaa' in ")
    assert f"{tmp_path} (the config's folder)" in folder[0]
    assert f"fix `model:` of pool 'beta' in {config}" in folder[0]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    hub = _refusal(config, "--pool", "hub", env=env)
    assert hub[-1] == "transformers imported: False"
    assert "'nobody/no-such-model' is no folder" in hub[0]
    assert f"not in the local Hugging Face cache ({tmp_path / 'hf'}" in hub[0]
    assert "hf download nobody/no-such-model" in hub[0]


def test_gpus_of_a_worker_are_checked_as_the_config_is(tmp_path, redis_url):
    config = write_config(
        tmp_path / "run.yaml",
        {
            "redis_url": redis_url,
            "teachers": [
                {"name": "v", "model": str(MODELS / "alpha"), "engine": "vllm", "device": "cuda"},
                {"name": "h", "model": str(MODELS / "alpha")},
            ],
            "meta_prover": {"name": "v"},
        },
    )
    two = _refusal(config, "--pool", "v", "--gpus", "0,1")
    assert "the server spans 1 GPU(s) (tensor parallelism) but is given 2 ([0, 1])" in two[0]
    hf = _refusal(config, "--pool", "h", "--gpus", "0")
    assert "engine 'hf' launches no server" in hf[0]
    words = _refusal(config, "--pool", "v", "--gpus", "two")
    assert "give GPU numbers" in words[0]
    assert all(out[-1] == "transformers imported: False" for out in (two, hf, words))
