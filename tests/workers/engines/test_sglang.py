"""The `sglang` engine against a server that speaks SGLang's /generate schema and computes
with the `hf` engine on the bundled models (`sglang_testserver`, test infrastructure):
the text and scores it gets, the requests it sends, attach mode, and the supervisor
(start, kill -9, a hung server, restart). Real SGLang: ops/gpu-check.sh on a GPU box."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cord.common import prompts
from cord.common.config import model_spec
from cord.common.messages import ExpandItem, ScoreItem
from cord.workers.engines import load_engine
from cord.workers.engines.hf import HFEngine
from cord.workers.engines.server import request_json
from cord.workers.engines.sglang import SGLangEngine, SGLangServer

ROOT = Path(__file__).resolve().parents[3]
MODEL = str(ROOT / "models" / "alpha")
SERVER = [sys.executable, "-m", "tests.workers.engines.sglang_testserver"]
STEP1 = "### Step 1. 3 + 4 = 7"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expand_item(key: str, steps: list[str] | None = None, **kw: Any) -> ExpandItem:
    steps = steps or []
    fields: dict[str, Any] = {
        "prompt": "What is 3 + 4 + 2?",
        "max_new_tokens": 48,
        "temperature": 0.0,
        "seed": 0,
        **kw,
    }
    return ExpandItem(key=key, steps=steps, next_step=len(steps) + 1, **fields)


def encode(engine: Any, text: str) -> list[int]:
    (ids,) = engine.encode_many([text])
    return list(ids)


def received(url: str) -> list[Any]:
    status, body = request_json("GET", url + "/test/requests")
    assert status == 200
    return list(body["requests"])


def sampling_params(request: dict[str, Any]) -> list[dict[str, Any]]:
    params = request["sampling_params"]
    return params if isinstance(params, list) else [params]


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers launched by the supervisor find the test server module, and write their
    logs under the test's temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("logs")))
        mp.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        )
        yield


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, launch_env: None) -> Iterator[str]:
    """A test server started by the test (for attach mode), seeds honoured."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("sglang") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *SERVER,
                "--model-path",
                MODEL,
                "--port",
                str(port),
                "--enable-deterministic-inference",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request_json("GET", url + "/health_generate", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def engine(server_url: str) -> Iterator[SGLangEngine]:
    spec = model_spec(name="alpha", model=MODEL, engine="sglang", sglang_url=server_url)
    eng = load_engine(spec)
    assert isinstance(eng, SGLangEngine)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf() -> HFEngine:
    return HFEngine(model_spec(name="alpha", model=MODEL))


@pytest.fixture(scope="module")
def supervised(launch_env: None) -> Iterator[SGLangEngine]:
    """An engine that launches and supervises its own test server (context 100 tokens
    on the server, 1024 in the model's config: the server refuses what the engine sends)."""
    spec = model_spec(
        name="alpha",
        model=MODEL,
        engine="sglang",
        sglang_launch=SERVER,
        sglang_args=["--context-length", "100"],
        startup_timeout_s=120,
        request_timeout_s=5,
        health_timeout_s=2,
        health_interval_s=600,  # probes only when a request fails: the tests decide when
    )
    eng = SGLangEngine(spec)
    yield eng
    eng.close()


# -- attach mode: what the engine gets and what it sends -----------------------------------
def test_expand_cuts_the_step_as_hf_does(engine: SGLangEngine, hf: HFEngine, server_url: str):
    items = [expand_item("x0"), expand_item("x1", [STEP1], temperature=0.6, seed=3)]
    got = engine.expand(items)
    want = hf.expand(items)
    for g, w in zip(got, want, strict=True):
        assert g.error is None, g.error
        assert g.finish == "step" and prompts.STEP_PREFIX not in g.text
        assert (g.text, g.finish, g.tokens, g.prompt_tokens) == (
            w.text,
            w.finish,
            w.tokens,
            w.prompt_tokens,
        )
    (request,) = received(server_url)[-1:]
    texts = [
        engine._chat_prefix(i.prompt) + prompts.think_body(i.steps, i.next_step) for i in items
    ]
    assert request["input_ids"] == engine.encode_many(texts)  # ids, not text
    assert "text" not in request
    params = sampling_params(request)
    assert [p["max_new_tokens"] for p in params] == [48, 48]
    assert [p["stop"] for p in params] == [list(prompts.STEP_STOPS)] * 2
    assert [p["sampling_seed"] for p in params] == [0, 3]
    assert params[0]["stop_token_ids"] == sorted(hf.eos_ids)


def test_same_seed_same_text(engine: SGLangEngine):
    base = expand_item(
        "s7", prompt="What is 6 + 8 + 3?", temperature=1.0, seed=7, max_new_tokens=24
    )
    others = [base.model_copy(update={"key": f"s{s}", "seed": s}) for s in range(8, 13)]
    first = engine.expand([base, *others])
    (again,) = engine.expand([base])
    assert again.error is None and again.text == first[0].text
    assert len({g.text for g in first}) > 1  # the seed does choose the sample


def test_answer_and_whole_trajectory(engine: SGLangEngine, hf: HFEngine):
    whole = expand_item("w", whole=True, max_new_tokens=120)
    (got,) = engine.expand([whole])
    (want,) = hf.expand([whole])
    assert (got.text, got.finish, got.tokens) == (want.text, want.finish, want.tokens)
    assert prompts.THINK_CLOSE not in got.text and got.finish in ("think_end", "length", "eos")
    from cord.common.messages import AnswerItem

    answer = AnswerItem(
        key="a",
        prompt="What is 3 + 4 + 2?",
        steps=[STEP1, "### Step 2. 7 + 2 = 9"],
        max_new_tokens=24,
        temperature=0.0,
        seed=0,
    )
    (got_a,) = engine.answer([answer])
    (want_a,) = hf.answer([answer])
    assert (got_a.text, got_a.finish, got_a.tokens) == (want_a.text, want_a.finish, want_a.tokens)


def test_shared_prefix_is_reported_cached(engine: SGLangEngine):
    question = "What is 5 + 5 + 1?"  # asked by no other test
    step1 = "### Step 1. 5 + 5 = 10"
    (first,) = engine.expand([expand_item("c0", [step1], prompt=question)])
    before = engine.stats()
    (second,) = engine.expand(
        [expand_item("c1", [step1, "### Step 2. 10 + 1 = 11"], prompt=question)]
    )
    after = engine.stats()
    shared = encode(engine, engine._chat_prefix(question) + step1)
    # Only the template's opening words are shared with earlier questions.
    assert first.error is None and first.cached_tokens < len(shared) - 1
    assert second.error is None and second.cached_tokens >= len(shared) - 1
    assert after["cached_tokens"] - before["cached_tokens"] == second.cached_tokens
    assert after["prompt_tokens"] - before["prompt_tokens"] == second.prompt_tokens


def test_score_equals_hf_score(engine: SGLangEngine, hf: HFEngine, server_url: str):
    steps = [STEP1, "### Step 2. 7 + 2 = 9"]
    items = [
        ScoreItem(key="r", prompt="What is 3 + 4 + 2?", steps=steps, answer="9"),
        ScoreItem(key="w", prompt="What is 3 + 4 + 2?", steps=steps[:1], answer="12"),
    ]
    got = engine.score(items)
    want = hf.score(items)
    for g, w in zip(got, want, strict=True):
        assert g.error is None, g.error
        assert abs(g.score - w.score) < 1e-4 and 0.0 < g.score <= 1.0
        assert (g.answer_tokens, g.prompt_tokens) == (w.answer_tokens, w.prompt_tokens)
    assert got[0].score != pytest.approx(got[1].score, abs=1e-3)
    (request,) = received(server_url)[-1:]
    contexts = [
        encode(engine, engine._chat_prefix(i.prompt) + prompts.scoring_context(i.steps))
        for i in items
    ]
    assert [p["max_new_tokens"] for p in sampling_params(request)] == [0, 0]
    assert request["return_logprob"] == [True, True]
    assert request["logprob_start_len"] == [len(c) - 1 for c in contexts]
    # A candidate that extends a scored trajectory reuses its prefix.
    longer = items[1].model_copy(update={"key": "l", "steps": [*steps, "### Step 3. 9"]})
    (again,) = engine.score([longer])
    assert (
        again.cached_tokens >= len(encode(engine, engine._chat_prefix(longer.prompt) + STEP1)) - 1
    )


def test_context_overflow_is_not_retryable_and_not_sent(engine: SGLangEngine, server_url: str):
    sent = len(received(server_url))
    long_steps = [f"### Step {i}. " + " + ".join(["9"] * 40) for i in range(1, 20)]
    (gen,) = engine.expand([expand_item("long", long_steps)])
    (score,) = engine.score([ScoreItem(key="ls", prompt="q", steps=long_steps, answer="1")])
    for result in (gen, score):
        assert result.error is not None and "exceed the context" in result.error
        assert not result.retryable
    assert len(received(server_url)) == sent


def test_every_request_bounds_max_new_tokens(engine: SGLangEngine, server_url: str):
    requests = received(server_url)
    assert len(requests) >= 6
    for request in requests:
        for params in sampling_params(request):
            assert isinstance(params["max_new_tokens"], int)


def test_attach_to_nothing_fails_at_start():
    url = f"http://127.0.0.1:{free_port()}"
    spec = model_spec(
        name="alpha", model=MODEL, engine="sglang", sglang_url=url, startup_timeout_s=1
    )
    with pytest.raises(RuntimeError, match="did not answer /health_generate"):
        SGLangEngine(spec)


# -- supervised: launch command, start, death, hang ------------------------------------------
def test_launch_command():
    spec = model_spec(
        name="m",
        model="/models/QwQ-32B",
        engine="sglang",
        dtype="bfloat16",
        tp_size=2,
        mem_fraction_static=0.8,
        sglang_args=["--context-length", "32768"],
    )
    assert SGLangServer(spec).launch_command(31000) == [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", "/models/QwQ-32B", "--host", "127.0.0.1", "--port", "31000",
        "--tp-size", "2", "--mem-fraction-static", "0.8", "--dtype", "bfloat16",
        "--enable-deterministic-inference", "--context-length", "32768",
    ]  # fmt: skip
    hf_spec = model_spec(name="m", model="x")
    assert (hf_spec.engine, hf_spec.device, hf_spec.max_batch) == ("hf", "cpu", 16)


def test_a_server_that_cannot_start_is_reported(launch_env: None):
    spec = model_spec(
        name="alpha",
        model=MODEL,
        engine="sglang",
        sglang_launch=[sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)"],
        startup_timeout_s=60,
    )
    with pytest.raises(RuntimeError, match=r"exited with 3 while starting(.|\n)*no GPU here"):
        SGLangEngine(spec)
    missing = spec.model_copy(update={"sglang_launch": ["/nonexistent/launch_server"]})
    with pytest.raises(RuntimeError, match="cannot run"):
        SGLangEngine(missing)


def test_server_context_refusal_fails_only_the_long_item(supervised: SGLangEngine):
    items = [expand_item("ok"), expand_item("long", [STEP1, "### Step 2. 7 + 2 = 9" * 4])]
    ok, long = supervised.expand(items)
    assert ok.error is None and ok.finish == "step"
    assert long.error is not None and "context length" in long.error and not long.retryable


def test_killed_server_fails_its_request_retryable_and_comes_back(supervised: SGLangEngine):
    server = supervised.server
    (warm,) = supervised.expand([expand_item("k0")])
    assert warm.error is None
    pid, url, restarts = server.pid, server.url, server.restarts
    assert pid is not None
    assert request_json("POST", url + "/test/stall", {"seconds": 60})[0] == 200
    sent = len(received(url))
    held: list[Any] = []
    worker = threading.Thread(target=lambda: held.extend(supervised.expand([expand_item("k1")])))
    worker.start()
    deadline = time.monotonic() + 30
    while len(received(url)) == sent:  # the server holds the request now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    worker.join(30)
    assert held and held[0].error is not None and held[0].retryable
    # A request sent while the process is still dying can fail too (retryable); once the
    # supervisor has seen the death, requests wait for the new server.
    deadline = time.monotonic() + 30
    while server.restarts == restarts:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (after,) = supervised.expand([expand_item("k2")])
    assert after.error is None and after.finish == "step"
    assert server.restarts == restarts + 1 and server.pid not in (None, pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_hung_server_is_replaced(supervised: SGLangEngine):
    """/health_generate keeps answering 200 while /generate hangs (sglang #6624): the
    request times out, retryable; the probe's /generate fails; the server is replaced."""
    server = supervised.server
    (warm,) = supervised.expand([expand_item("h0")])
    assert warm.error is None
    pid, url, restarts = server.pid, server.url, server.restarts
    assert request_json("POST", url + "/test/hang", {})[0] == 200
    assert request_json("GET", url + "/health_generate")[0] == 200
    (hung,) = supervised.expand([expand_item("h1")])
    assert hung.error is not None and hung.retryable and "timed out" in hung.error
    deadline = time.monotonic() + 90
    while server.restarts == restarts:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    (after,) = supervised.expand([expand_item("h2")])
    assert after.error is None and after.finish == "step"
    assert server.pid not in (None, pid)
