"""The `vllm` engine against real vLLM servers (vLLM's CPU build) on the bundled models:
greedy steps as the `hf` engine writes them, S as `hf` computes it, the server's own
prefix-cache counters, seeds, and a supervised server killed with SIGKILL mid-task."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cord.common import prompts
from cord.common.messages import ExpandItem, ScoreItem
from cord.common.pools import model_spec
from cord.lab.arith import make_problems, solution_steps
from cord.workers.engines.base import IdRequest, expand_texts
from cord.workers.engines.hf import HFEngine
from cord.workers.engines.vllm import VLLMEngine, VLLMServer
from tests.conftest import MODELS, VLLM_TEST

pytestmark = pytest.mark.slow

PROBLEMS = make_problems(6, seed=515151)


def expand_items(n_steps: int = 1, **kw: Any) -> list[ExpandItem]:
    """One item per lab problem, continuing its first `n_steps - 1` correct steps."""
    items = []
    for i, p in enumerate(PROBLEMS):
        steps = solution_steps(p.terms)[: n_steps - 1]
        fields: dict[str, Any] = {"max_new_tokens": 48, "temperature": 0.0, "seed": i, **kw}
        items.append(
            ExpandItem(
                key=f"{p.id}:{n_steps}", prompt=p.question, steps=steps, next_step=n_steps, **fields
            )
        )
    return items


def score_items() -> list[ScoreItem]:
    items = []
    for p in PROBLEMS:
        steps = solution_steps(p.terms)
        for k in (1, len(steps)):  # a partial and a whole trajectory
            items.append(
                ScoreItem(key=f"{p.id}:{k}", prompt=p.question, steps=steps[:k], answer=p.answer)
            )
    return items


def attached(name: str, url: str) -> VLLMEngine:
    spec = model_spec(name=name, model=str(MODELS / name), vllm_url=url, **VLLM_TEST)
    return VLLMEngine(spec)


@pytest.fixture(scope="module")
def alpha(vllm_urls: dict[str, str]) -> Iterator[VLLMEngine]:
    engine = attached("alpha", vllm_urls["alpha"])
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def meta(vllm_urls: dict[str, str]) -> Iterator[VLLMEngine]:
    engine = attached("meta", vllm_urls["meta"])
    yield engine
    engine.close()


def hf(name: str) -> HFEngine:
    return HFEngine(model_spec(name=name, model=str(MODELS / name)))


def near_tie(engine: HFEngine, prompt: list[int], a: int, b: int) -> float:
    """How far apart the log-probs of tokens a and b are after `prompt` (hf, float32)."""
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    return abs(float(logp[a] - logp[b]))


def test_greedy_steps_equal_hf(alpha: VLLMEngine):
    """The same ids from both engines, or a near-tie of two tokens where they part."""
    ref = hf("alpha")
    items = expand_items(1) + expand_items(2)
    texts, stops = expand_texts(ref._prefix, items)
    requests = [
        IdRequest(ids, 48, 0.0, 1.0, 0, stop)
        for ids, stop in zip(ref.encode_many(texts), stops, strict=True)
    ]
    got = alpha.generate_ids(requests)
    want = ref.generate_ids(requests)
    same = 0
    for request, g, w in zip(requests, got, want, strict=True):
        assert not isinstance(g, Exception) and not isinstance(w, Exception), g
        if g.ids == w.ids:
            same += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(g.ids, w.ids, strict=False)) if x != y)
        gap = near_tie(ref, request.ids + w.ids[:k], g.ids[k], w.ids[k])
        assert gap < 1e-2, (k, gap, ref.decode(g.ids), ref.decode(w.ids))
    assert same >= len(requests) - 2, f"only {same} of {len(requests)} identical"
    # Through the engine interface: the step cut and finish as hf gives them.
    for g, w in zip(alpha.expand(items), ref.expand(items), strict=True):
        assert g.error is None, g.error
        assert g.finish == "step" and prompts.STEP_PREFIX not in g.text
        if g.tokens == w.tokens:
            assert (g.text, g.finish, g.prompt_tokens) == (w.text, w.finish, w.prompt_tokens)


def test_scores_equal_hf(meta: VLLMEngine):
    ref = hf("meta")
    items = score_items()
    got, want = meta.score(items), ref.score(items)
    for g, w in zip(got, want, strict=True):
        assert g.error is None, g.error
        assert g.answer_tokens == w.answer_tokens > 0
        assert abs(g.score - w.score) < 1e-3, (g.key, g.score, w.score)
    assert max(s.score for s in got) - min(s.score for s in got) > 0.01  # not all alike


def test_scoring_and_expansion_hit_the_server_prefix_cache(alpha: VLLMEngine, meta: VLLMEngine):
    """The server's own counters (vllm:prefix_cache_hits_total) grow, and so do the
    cached tokens the engine reports per item: the context is not prefilled again."""
    items = score_items()
    meta.score(items)  # the contexts are in the cache after this
    before = meta.server_metrics()
    again = meta.score(items)
    after = meta.server_metrics()
    # Whole blocks of 32 tokens are cached: most of each prompt, never all of it.
    assert after["hits"] - before["hits"] >= 0.3 * sum(s.prompt_tokens for s in again)
    assert all(s.cached_tokens > 0 for s in again)
    # Expansion: step 2 of each problem extends the prompt of step 1.
    alpha.expand(expand_items(1))
    before = alpha.server_metrics()
    second = alpha.expand(expand_items(2))
    after = alpha.server_metrics()
    assert after["hits"] > before["hits"] and all(g.cached_tokens > 0 for g in second)
    stats = alpha.stats()
    assert stats.tokens.cached > 0 and (stats.server_cache_hit_tokens or 0) >= after["hits"] > 0
    # The server's KV cache and queue, for admission: blocks x block size, idle now.
    assert stats.kv_capacity_tokens and stats.kv_capacity_tokens % 32 == 0
    assert stats.requests_running == stats.requests_waiting == 0


def test_a_seed_samples_the_same_step_again(alpha: VLLMEngine):
    """A re-sent item (same seed) writes the same step at T = 0.6; other seeds differ."""
    first = alpha.expand(expand_items(1, temperature=0.6))
    again = alpha.expand(expand_items(1, temperature=0.6))
    assert [g.text for g in first] == [g.text for g in again]
    other = alpha.expand(expand_items(1, temperature=0.6, seed=12345))
    assert [g.text for g in other] != [g.text for g in first]


def test_killed_server_fails_retryable_restarts_and_serves(vllm_urls: dict[str, str]):
    """A supervised server killed with SIGKILL while it holds a task: its items fail
    retryable, the supervisor starts a new server, the same items then succeed."""
    spec = model_spec(
        name="alpha", model=str(MODELS / "alpha"), **{**VLLM_TEST, "health_interval_s": 5}
    )
    engine = VLLMEngine(spec)
    try:
        server = engine.server
        items = expand_items(1)
        assert all(g.error is None for g in engine.expand(items[:1]))
        pid, restarts = server.pid, server.restarts
        assert pid is not None
        held: list[Any] = []
        task = threading.Thread(target=lambda: held.extend(engine.expand(items)))
        # Frozen (SIGSTOP), the server's socket still takes the task's requests: it holds
        # them for sure when it dies, however fast it would have answered.
        os.killpg(pid, signal.SIGSTOP)
        task.start()
        time.sleep(2.0)
        assert task.is_alive()
        os.kill(pid, signal.SIGKILL)
        os.killpg(pid, signal.SIGCONT)  # the rest of its tree: the supervisor ends it
        task.join(120)
        # What the dead server held failed retryable; an item sent after it died waited
        # for the new server instead (nothing was lost, nothing hangs).
        assert len(held) == len(items) and any(g.error for g in held), held
        assert all(g.retryable for g in held if g.error), held
        deadline = time.monotonic() + 600
        while server.restarts == restarts or server.pid is None:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        after = engine.expand(items)
        assert all(g.error is None and g.tokens > 0 for g in after), after
        assert server.pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        engine.close()


def test_launch_command_and_environment():
    spec = model_spec(
        name="m",
        model="/models/R1",
        engine="vllm",
        max_model_len=32768,
        gpu_memory_utilization=0.9,
        tensor_parallel_size=2,
        vllm_args=["--block-size", "32"],
    )
    server = VLLMServer(spec)
    assert server.launch_command(31000) == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/models/R1", "--host", "127.0.0.1", "--port", "31000",
        "--dtype", "float32", "--tensor-parallel-size", "2",
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--max-model-len", "32768", "--gpu-memory-utilization", "0.9",
        "--enforce-eager", "--no-enable-chunked-prefill",
        "--distributed-executor-backend", "uni", "--kv-cache-memory-bytes", "1073741824",
        "--block-size", "32",
    ]  # fmt: skip
    env = server.launch_env()
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # whole GiB only: the byte flag instead
    half = VLLMServer(spec.model_copy(update={"cpu_kvcache_gib": 0.5})).launch_command(1)
    assert half[half.index("--kv-cache-memory-bytes") + 1] == str(2**29)
    threads = VLLMServer(spec.model_copy(update={"cpu_threads": 8})).launch_env()
    assert threads["OMP_NUM_THREADS"] == "8"
    gpu = VLLMServer(spec.model_copy(update={"device": "cuda", "dtype": "bfloat16"}))
    cmd = gpu.launch_command(31000)
    assert "--enforce-eager" not in cmd and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert "--distributed-executor-backend" not in cmd and "--kv-cache-memory-bytes" not in cmd
    assert "OMP_NUM_THREADS" not in gpu.launch_env()
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu.launch_env()


def test_the_launched_server_runs_on_the_gpus_its_pool_names(tmp_path):
    """`gpus` (or `device: cuda:N`) becomes the launched server's CUDA_VISIBLE_DEVICES:
    the environment of the process the worker starts, read back from it."""
    seen = tmp_path / "env"
    dump = f"import os; open({str(seen)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"
    base = {
        "name": "m",
        "model": "/models/R1",
        "engine": "vllm",
        "vllm_launch": ["python", "-c", dump],
    }
    for fields, visible in (
        ({"device": "cuda", "tensor_parallel_size": 2, "gpus": [2, 3]}, "2,3"),
        ({"device": "cuda:1"}, "1"),
        ({"device": "cuda"}, None),  # every GPU the worker sees: its own environment
    ):
        seen.unlink(missing_ok=True)
        server = VLLMServer(model_spec(**base, **fields))
        server._launch()
        try:
            deadline = time.monotonic() + 60
            while not seen.exists() or not seen.read_text():
                assert time.monotonic() < deadline, "the launched process wrote nothing"
                time.sleep(0.05)
        finally:
            server._kill()
        inherited = os.environ.get("CUDA_VISIBLE_DEVICES", "-")
        assert seen.read_text() == (visible if visible is not None else inherited)


def test_items_are_handed_over_as_their_requests_end(alpha: VLLMEngine):
    """One request per item: with an `emit`, each generation goes out as its request
    ends, every item once, the same as without."""
    items = expand_items(1, temperature=0.0)
    handed: list[str] = []
    streamed = alpha.expand(items, emit=lambda ready: handed.extend(g.key for g in ready))
    assert sorted(handed) == sorted(i.key for i in items)  # each once, as it ended
    plain = alpha.expand(items)
    assert [(g.key, g.text) for g in streamed] == [(g.key, g.text) for g in plain]


def test_every_item_of_every_running_task_reaches_the_server_at_once(
    vllm_urls: dict[str, str],
):
    """Two tasks of 48 items (`concurrency` 2, `max_batch` 48): all 96 requests are at
    the server together, by its own gauges, where the client used to hold all but 64."""
    spec = model_spec(
        name="alpha",
        model=str(MODELS / "alpha"),
        vllm_url=vllm_urls["alpha"],
        concurrency=2,
        max_batch=48,
        **VLLM_TEST,
    )
    engine = VLLMEngine(spec)
    items = [
        ExpandItem(
            key=f"{p.id}:{k}",
            prompt=p.question,
            steps=[],
            next_step=1,
            max_new_tokens=48,
            temperature=0.6,
            seed=k,
        )
        for k in range(16)
        for p in PROBLEMS
    ]
    assert len(items) == 96
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            found = engine.server_metrics()
            peak[0] = max(peak[0], int(found.get("running", 0) + found.get("waiting", 0)))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        tasks = [
            threading.Thread(target=engine.expand, args=(half,))
            for half in (items[:48], items[48:])
        ]
        for t in tasks:
            t.start()
        for t in tasks:
            t.join()
    finally:
        stop.set()
        watcher.join()
        engine.close()
    assert peak[0] > 64, f"at most {peak[0]} requests were at the server at once"
