"""The `sglang` engine against a server that speaks SGLang's /generate schema and computes
with the `hf` engine on the bundled models (`sglang_testserver`, test infrastructure):
the text and scores it gets, the requests it sends, attach mode, and the supervisor
(start, kill -9, a hung server, restart). Real SGLang: ops/gpu-check.sh on a GPU box."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cord.common import prompts
from cord.common.log import get_logger
from cord.common.messages import ExpandItem, ScoreItem
from cord.common.metrics import free_port
from cord.common.pools import model_spec
from cord.workers.engines import load_engine
from cord.workers.engines.base import IdOutput, IdRequest, expand_texts
from cord.workers.engines.hf import HFEngine
from cord.workers.engines.server import request_json
from cord.workers.engines.sglang import SGLangEngine, SGLangServer, _is_length_error

ROOT = Path(__file__).resolve().parents[3]
MODEL = str(ROOT / "models" / "alpha")
SERVER = [sys.executable, "-m", "tests.workers.engines.sglang_testserver"]
STEP1 = "### Step 1. 3 + 4 = 7"


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


def prompt_len(engine: Any, item: ExpandItem) -> int:
    (ids,) = engine.encode_many(expand_texts(engine._prefix, [item])[0])
    return len(ids)


def sized_item(engine: Any, key: str, lo: int, hi: int, **kw: Any) -> tuple[ExpandItem, int]:
    """An expansion whose prompt is `lo` to `hi` tokens long, and its length."""
    for n in range(1, 80):
        item = expand_item(key, ["### Step 1. " + " + ".join(["1"] * n)], **kw)
        length = prompt_len(engine, item)
        if lo <= length <= hi:
            return item, length
    raise AssertionError(f"no prompt of {lo} to {hi} tokens")


def warnings_of(logs: list[MutableMapping[str, Any]]) -> set[str]:
    return {e["event"] for e in logs if e.get("log_level") == "warning"}


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


@contextlib.contextmanager
def running_server(log_path: Path, *flags: str) -> Iterator[str]:
    """A test server started by the test (for attach mode) with `flags`; its URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*SERVER, "--model-path", MODEL, "--port", str(port), *flags],
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
def server_url(tmp_path_factory: pytest.TempPathFactory, launch_env: None) -> Iterator[str]:
    """Seeds honoured."""
    log_path = tmp_path_factory.mktemp("sglang") / "server.log"
    with running_server(log_path, "--enable-deterministic-inference") as url:
        yield url


@pytest.fixture(scope="module")
def plain_url(tmp_path_factory: pytest.TempPathFactory, launch_env: None) -> Iterator[str]:
    """Started without --enable-deterministic-inference and with its radix cache off."""
    log_path = tmp_path_factory.mktemp("sglang") / "plain.log"
    with running_server(log_path, "--disable-radix-cache") as url:
        yield url


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
    assert after.tokens.cached - before.tokens.cached == second.cached_tokens
    assert after.tokens.prompt - before.tokens.prompt == second.prompt_tokens


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


def test_aborted_requests_are_retryable(engine: SGLangEngine, server_url: str):
    """SGLang answers a request aborted in its waiting queue with HTTP 200 and
    finish_reason {"type": "abort"}: another try, not a model mismatch."""
    scores = [ScoreItem(key="ab", prompt="What is 3 + 4 + 2?", steps=[STEP1], answer="9")]
    assert request_json("POST", server_url + "/test/abort", {})[0] == 200
    (score,) = engine.score(scores)
    assert request_json("POST", server_url + "/test/abort", {})[0] == 200
    (gen,) = engine.expand([expand_item("ab")])
    for result in (score, gen):
        assert result.error is not None and "aborted" in result.error, result.error
        assert result.retryable
    (again,) = engine.score(scores)  # the hook held one call only
    assert again.error is None


def test_nan_stop_is_a_retryable_error_not_a_step(engine: SGLangEngine, server_url: str):
    """SGLang's own stop {"type": "stop", "matched": "NaN happened"} (NaN in the logits)
    is no step end, no end of turn and no text to keep."""
    assert request_json("POST", server_url + "/test/nan", {})[0] == 200
    items = [expand_item("nan0"), expand_item("nan1", [STEP1])]
    got = engine.expand(items)
    answer = received(server_url)[-1]
    assert len(answer["input_ids"]) == 2  # both went, in one call
    for g in got:
        assert g.error is not None and "NaN happened" in g.error and g.retryable, g
    again = engine.expand(items)
    assert all(g.error is None and g.finish == "step" for g in again)


def test_server_cut_is_read_at_the_first_stop_in_the_text(engine: SGLangEngine):
    """When decoding here shows no stop string, the server's cut is used; SGLang names
    the first of the stop list in `matched` and cuts its text there, so an earlier stop
    string of ours in that text is the real end."""
    r = IdRequest([1, 2, 3], 16, 0.0, 1.0, 0, prompts.STEP_STOPS)
    reason = {"type": "stop", "matched": prompts.STEP_PREFIX}
    for text, want in [("x = 1</think> y", ("x = 1", "think_end")), ("x = 1 ", ("x = 1 ", "step"))]:
        out = {
            "text": text,
            "output_ids": encode(engine, " x"),
            "meta_info": {"finish_reason": reason},
        }
        got = engine._output(r, out)
        assert isinstance(got, IdOutput)
        gen = engine._generation("k", r, got)
        assert (gen.text, gen.finish) == want


def test_matched_is_the_first_of_the_stop_list(engine: SGLangEngine, server_url: str):
    """0.5.23 tries the stop strings in list order (Req._check_str_based_finish): when
    the token that ends the output completes two of them, `matched` is the first listed,
    even where the other starts earlier in the text; `text` is cut at it."""
    prompt = encode(engine, engine._chat_prefix("What is 2 + 5 + 1?"))
    greedy: dict[str, Any] = {"max_new_tokens": 12, "temperature": 0}
    body = {"input_ids": prompt, "sampling_params": greedy}
    status, free = request_json("POST", server_url + "/generate", body)
    assert status == 200
    tokens = free["output_ids"]
    for k in range(1, len(tokens)):
        prev, cur = engine.decode(tokens[:k]), engine.decode(tokens[: k + 1])
        # Strings the last token completes (none of them in the output before it).
        fresh = {
            cur[i:j]
            for j in range(len(prev) + 1, len(cur) + 1)
            for i in range(max(0, len(prev) - 3), j)
            if cur[i:j] not in prev
        }
        pairs = [(a, b) for a in fresh for b in fresh if cur.find(b) < cur.find(a)]
        if pairs:
            later, earlier = min(pairs, key=lambda p: (len(p[0]) + len(p[1]), p))
            break
    else:
        pytest.skip("no token completes two stop strings here")
    params = {**greedy, "stop": [later, earlier], "skip_special_tokens": False}
    status, answer = request_json(
        "POST", server_url + "/generate", {"input_ids": prompt, "sampling_params": params}
    )
    assert status == 200
    assert answer["output_ids"] == tokens[: k + 1]
    assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": later}
    assert answer["text"] == cur[: cur.find(later)]


def test_server_info_and_the_warnings_read_from_it(server_url: str, plain_url: str):
    """/server_info holds the resolved server arguments by field name; the engine warns
    when seeds are ignored (no --enable-deterministic-inference) or the radix cache is
    off, and stays quiet when neither."""
    status, info = request_json("GET", plain_url + "/server_info")
    assert status == 200
    assert info["enable_deterministic_inference"] is False
    assert info["disable_radix_cache"] is True
    assert info["max_req_input_len"] == 1024 - 6  # the model's context, no --context-length
    assert info["context_length"] is None and info["version"] == "0.5.23"
    assert request_json("GET", server_url + "/server_info")[1]["enable_deterministic_inference"]
    get_logger("cord.test")  # structlog configured before it is captured
    for url, want in [
        (plain_url, {"sglang_seeds_ignored", "sglang_radix_cache_off"}),
        (server_url, set()),
    ]:
        spec = model_spec(name="alpha", model=MODEL, engine="sglang", sglang_url=url)
        with capture_logs() as logs:
            eng = SGLangEngine(spec)
        eng.close()
        assert warnings_of(logs) & {"sglang_seeds_ignored", "sglang_radix_cache_off"} == want
        assert "sglang_server_info_unread" not in warnings_of(logs)


@pytest.mark.parametrize(
    "message",
    [  # SGLang 0.5.23's refusals of a prompt too long, each an HTTP 400
        "The input (120 tokens) is longer than the model's context length (100 tokens).",
        "Requested token count exceeds the model's maximum context length of 100 tokens. "
        "You requested a total of 130 tokens: 90 tokens from the input messages and 40 "
        "tokens for the completion. Please reduce the number of tokens in the input "
        "messages or the completion to fit within the limit.",
        "Input length (95 tokens) exceeds the maximum allowed length (94 tokens). Use a "
        "shorter input or enable --allow-auto-truncate.",
        "Request prompt exceeds the KV memory budget: input_len=4000.",
    ],
)
def test_length_refusals_are_known(message: str):
    assert _is_length_error(message)
    assert not _is_length_error("stop has 2 entries for 1 inputs")


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


def test_scheduler_length_refusal_fails_only_that_item(supervised: SGLangEngine):
    """The scheduler refuses an input of max_req_input_len (context - 6 = 94) tokens or
    more, though it and its max_new_tokens fit the context: HTTP 400 "... exceeds the
    maximum allowed length ..." for the whole batch. That item fails, not retryable;
    the others run."""
    long, length = sized_item(supervised, "long", 94, 96)
    long = long.model_copy(update={"max_new_tokens": 100 - length})
    items = [expand_item("ok0"), long, expand_item("ok1", [STEP1])]
    ok0, refused, ok1 = supervised.expand(items)
    assert refused.error is not None and not refused.retryable
    assert "exceeds the maximum allowed length (94 tokens)" in refused.error
    for ok in (ok0, ok1):
        assert ok.error is None and ok.finish == "step", ok


def test_prompt_and_budget_may_fill_the_context(supervised: SGLangEngine):
    """0.5.23 refuses an input plus max_new_tokens above the context, not one equal to
    it, and its scheduler caps max_new_tokens at context - 2 - input."""
    item, length = sized_item(supervised, "full", 60, 80, whole=True)
    item = item.model_copy(update={"max_new_tokens": 100 - length})
    (got,) = supervised.expand([item])
    assert got.error is None, got.error
    assert got.tokens <= 100 - 2 - length
    over = item.model_copy(update={"key": "over", "max_new_tokens": 101 - length})
    (refused,) = supervised.expand([over])
    assert refused.error is not None and "maximum context length of 100" in refused.error
    assert not refused.retryable


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
