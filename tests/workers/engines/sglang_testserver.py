"""TEST INFRASTRUCTURE, not part of cord: a stand-in for `python -m sglang.launch_server`
that speaks SGLang 0.5.23's native ``/generate`` schema (request and response shapes)
but computes with the `hf` engine on the bundled tiny models, on CPU. It lets the test
suite exercise the `sglang` engine's client and its supervisor for real (HTTP, a
subprocess, kill -9) where SGLang itself cannot be installed (it needs CUDA).
ops/gpu-check.sh checks the engine against real SGLang on a GPU box.

    python -m tests.workers.engines.sglang_testserver --model-path models/alpha --port 30000

What it honours, as SGLang does:
- ``input_ids`` (one list, or a batch of lists; text prompts are refused), and per item
  ``sampling_params``: ``max_new_tokens`` (default 128; 0 = prefill only),
  ``temperature`` (below 1e-6 = greedy), ``top_p``, ``stop``, ``stop_token_ids`` (on top of
  the model's eos), ``skip_special_tokens``, ``no_stop_trim``, ``sampling_seed`` (only
  with ``--enable-deterministic-inference``, as SGLang; else every request samples
  afresh).
- ``return_logprob`` with ``logprob_start_len`` for prefill-only requests:
  ``meta_info.input_token_logprobs`` is ``[[logprob, token_id, None], ...]`` from that
  position on, its first logprob None; the prefix cache is reused only up to it.
- ``meta_info``: ``id``, ``finish_reason`` (``{type: stop, matched: str | id}``,
  ``{type: length, length}``), ``prompt_tokens``, ``completion_tokens``,
  ``cached_tokens`` (the hf engine's prefix-cache hit), ``e2e_latency``; ``text`` cut
  at the stop string, ``output_ids`` still holding the token that completed it (and the
  stop token id).
- Length limits, as 0.5.23 applies them (C = ``--context-length``, else the model's):
  the tokenizer manager refuses an input of >= C tokens ("The input (N tokens) is
  longer than the model's context length (C tokens).") and an input plus a given
  ``max_new_tokens`` of > C ("Requested token count exceeds the model's maximum
  context length of C tokens. ..."); the scheduler then refuses an input of >=
  ``max_req_input_len`` = C - 6 tokens ("Input length (N tokens) exceeds the maximum
  allowed length (C - 6 tokens). Use a shorter input or enable --allow-auto-truncate.")
  and caps ``max_new_tokens`` at C - 2 - N. Any refusal answers the whole call with
  HTTP 400 ``{"error": {"message": ...}}`` (SGLang gathers a batch's items and fails
  it on the first error).
- A stop string: when several are in the output, ``matched`` is the first of the
  request's ``stop`` list that is (SGLang tries them in list order), and ``text`` is
  cut at that string's first occurrence.
- ``/health`` and ``/health_generate`` answer 503 while the model loads, then 200;
  ``/get_model_info``; ``/server_info``: the server arguments by their field names
  (those of the flags below, ``disable_radix_cache`` among them), ``launch_command``,
  ``max_req_input_len``, ``status``, ``version``. Launch flags: ``--model-path --host
  --port --tp-size --mem-fraction-static --dtype --context-length
  --enable-deterministic-inference --disable-radix-cache`` (the hf engine's prefix
  cache off); others are ignored.

Not supported (400): ``n`` > 1, streaming, logprobs of generated tokens. When several
stop token ids are given, the hf engine does not say which one ended a row; the smallest
is reported (the bundled models have one).

Test hooks (not SGLang's), under ``/test/``: ``GET /test/requests`` lists every
``/generate`` body received; ``POST /test/stall {"seconds": s}`` holds each later
``/generate`` that long before computing; ``POST /test/hang`` makes every later
``/generate`` block for good while ``/health_generate`` keeps answering 200 (a dead
scheduler behind a live HTTP server, sglang #6624); ``POST /test/nan`` makes the next
``/generate`` end each generation as SGLang does when the logits hold NaN (the last
output id replaced by the eos id, ``finish_reason {"type": "stop", "matched": "NaN
happened"}``, the text not cut); ``POST /test/abort`` makes every item of the next
``/generate`` come back aborted, HTTP 200 with ``finish_reason {"type": "abort",
"message": "Abort in waiting queue"}``, as an abort in SGLang's waiting queue does.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cord.workers.engines.base import IdRequest

# SGLang's --dtype names, as the hf engine spells them (anything else: auto).
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}


class Refused(Exception):
    """A request the server answers with 400."""


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine: Any = None  # HFEngine once loaded
        self.lock = threading.Lock()  # the hf engine serves one call at a time
        self.requests: list[Any] = []
        self.stall_s = 0.0
        self.hang = threading.Event()
        self.nan_next = False  # the next /generate: generations end in NaN
        self.abort_next = False  # the next /generate: every item aborted
        self.started = time.time()

    @property
    def context_len(self) -> int:
        return int(self.args.context_length or self.engine.max_context or 1 << 30)

    @property
    def max_req_len(self) -> int:
        # The scheduler's: min(context - 1, KV pool - 1); the hf engine has no pool bound.
        return self.context_len - 1

    @property
    def max_req_input_len(self) -> int:
        return self.max_req_len - 5

    def server_info(self) -> dict[str, Any]:
        """/server_info's shape in 0.5.23: the resolved server arguments by field name,
        the launch command, the scheduler's start-up info, the version."""
        a = self.args
        return {
            "model_path": a.model_path,
            "host": a.host,
            "port": a.port,
            "tp_size": a.tp_size,
            "mem_fraction_static": a.mem_fraction_static,
            "dtype": a.dtype,
            "context_length": a.context_length,
            "enable_deterministic_inference": a.enable_deterministic_inference,
            "disable_radix_cache": a.disable_radix_cache,
            "launch_command": " ".join(sys.argv),
            "status": "ready",
            "max_req_input_len": self.max_req_input_len,
            "startup_time": self.started,
            "internal_states": [],
            "version": "0.5.23",
            "frontend": "python",
        }

    # -- /generate ---------------------------------------------------------------------
    def generate(self, body: dict[str, Any], nan: bool = False, abort: bool = False) -> Any:
        if body.get("stream"):
            raise Refused("the test server does not stream")
        input_ids = body.get("input_ids")
        if not input_ids:
            raise Refused("the test server takes input_ids only (no text)")
        single = isinstance(input_ids[0], int)
        batch: list[list[int]] = [input_ids] if single else input_ids
        n = len(batch)
        params = self._per_item(body.get("sampling_params") or {}, n, "sampling_params")
        want_logprob = self._per_item(body.get("return_logprob") or False, n, "return_logprob")
        starts = self._per_item(body.get("logprob_start_len"), n, "logprob_start_len")
        items = []
        for ids, p, logprob, start in zip(batch, params, want_logprob, starts, strict=True):
            if not ids or not all(isinstance(t, int) for t in ids):
                raise Refused("input_ids must be lists of token ids")
            p = dict(p or {})
            if p.get("n", 1) != 1:
                raise Refused("the test server supports n = 1 only")
            given = p.get("max_new_tokens")
            self._check_context(len(ids), None if given is None else int(given))
            max_new = 128 if given is None else int(given)  # SGLang's default
            start = -1 if start is None else int(start)
            if logprob and max_new > 0:
                raise Refused("the test server returns logprobs for prefill-only requests")
            if logprob and start >= len(ids):
                raise Refused(f"logprob_start_len ({start}) must be below the input length")
            items.append((ids, p, max_new, bool(logprob), start))
        # The scheduler's checks come after the tokenizer manager's, item by item.
        for k, (ids, p, max_new, logprob, start) in enumerate(items):
            self._check_input(len(ids))
            max_new = max(0, min(max_new, self.max_req_len - len(ids) - 1))
            items[k] = (ids, p, max_new, logprob, start)
        began = time.perf_counter()
        if abort:
            aborted = [self._aborted(item[3], began) for item in items]
            return aborted[0] if single else aborted
        results: list[dict[str, Any] | None] = [None] * n
        with self.lock:
            gen = [i for i, item in enumerate(items) if item[2] > 0]
            groups: dict[frozenset[int], list[int]] = {}
            for i in gen:
                stop_ids = frozenset(int(t) for t in items[i][1].get("stop_token_ids") or [])
                groups.setdefault(stop_ids, []).append(i)
            for stop_ids, indices in groups.items():
                answers = self._generate(items, indices, stop_ids, nan)
                for i, out in zip(indices, answers, strict=True):
                    results[i] = out
            for i, (ids, _, _, logprob, start) in enumerate(items):
                if items[i][2] == 0:
                    results[i] = self._prefill(ids, logprob, start)
        for answer in results:
            assert answer is not None
            answer["meta_info"]["e2e_latency"] = time.perf_counter() - began
        return results[0] if single else results

    @staticmethod
    def _per_item(value: Any, n: int, name: str) -> list[Any]:
        if isinstance(value, list):
            if len(value) != n:
                raise Refused(f"{name} has {len(value)} entries for {n} inputs")
            return value
        return [value] * n

    def _check_context(self, prompt: int, max_new: int | None) -> None:
        # SGLang's tokenizer manager (TokenizerManager._validate_one_request), in its words:
        # the input alone may not reach the context, the input plus a given
        # max_new_tokens may not pass it.
        limit = self.context_len
        if prompt >= limit:
            raise Refused(
                f"The input ({prompt} tokens) is longer than the model's context length "
                f"({limit} tokens)."
            )
        if max_new is not None and prompt + max_new > limit:
            raise Refused(
                f"Requested token count exceeds the model's maximum context length of {limit} "
                f"tokens. You requested a total of {prompt + max_new} tokens: {prompt} tokens "
                f"from the input messages and {max_new} tokens for the completion. Please "
                "reduce the number of tokens in the input messages or the completion to fit "
                "within the limit."
            )

    def _check_input(self, prompt: int) -> None:
        # SGLang's scheduler (managers/utils.validate_input_length), in its words.
        limit = self.max_req_input_len
        if prompt >= limit:
            raise Refused(
                f"Input length ({prompt} tokens) exceeds the maximum allowed length "
                f"({limit} tokens). Use a shorter input or enable --allow-auto-truncate."
            )

    @staticmethod
    def _aborted(logprob: bool, began: float) -> dict[str, Any]:
        # TokenizerManager._handle_abort_req's answer for a request aborted while waiting.
        meta: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "weight_version": "default",
            "e2e_latency": time.perf_counter() - began,
            "completion_tokens": 0,
        }
        if logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = []
        return {"text": "", "output_ids": [], "meta_info": meta}

    def _seed(self, p: dict[str, Any]) -> int:
        if not self.args.enable_deterministic_inference:
            return secrets.randbits(63)  # SGLang ignores sampling_seed without the flag
        seed = p.get("sampling_seed")
        return 42 if seed is None else int(seed)

    def _generate(
        self, items: list[tuple], indices: list[int], stop_ids: frozenset[int], nan: bool
    ) -> list[dict[str, Any]]:
        engine = self.engine
        chosen = [items[i] for i in indices]
        stops = []
        for _, p, _, _, _ in chosen:
            stop = p.get("stop") or []
            stops.append(tuple([stop] if isinstance(stop, str) else stop))
        temps = [float(p.get("temperature", 1.0)) for _, p, _, _, _ in chosen]
        requests = [
            IdRequest(
                ids,
                max_new,
                0.0 if t < 1e-6 else t,
                float(p.get("top_p", 1.0)),
                self._seed(p),
                stop,
            )
            for (ids, p, max_new, _, _), t, stop in zip(chosen, temps, stops, strict=True)
        ]
        outs = engine.generate_ids(requests, set(stop_ids))
        return [
            self._answer(ids, p, max_new, stop, out, stop_ids, nan)
            for (ids, p, max_new, _, _), stop, out in zip(chosen, stops, outs, strict=True)
        ]

    def _answer(
        self,
        ids: list[int],
        p: dict[str, Any],
        max_new: int,
        stop: tuple[str, ...],
        out: Any,
        stop_ids: frozenset[int],
        nan: bool,
    ) -> dict[str, Any]:
        """One request's response item, as SGLang writes it for what `out` generated."""
        engine = self.engine
        skip = bool(p.get("skip_special_tokens", True))
        output_ids = list(out.ids)
        text = engine.tokenizer.decode(output_ids, skip_special_tokens=skip)
        raw = engine.decode(output_ids)
        # Req._check_str_based_finish tries the stop strings in list order.
        found = [s for s in stop if s in raw]
        reason: dict[str, Any]
        if nan:
            # Req._check_vocab_boundary_finish: the NaN token becomes the eos id, the
            # output ends there, and the detokenizer finds no "NaN happened" to cut.
            at = len(output_ids) // 2
            output_ids = [*output_ids[:at], min(engine.eos_ids or stop_ids or {0})]
            text = engine.tokenizer.decode(output_ids, skip_special_tokens=skip)
            reason = {"type": "stop", "matched": "NaN happened"}
        elif found and not out.eos:
            matched = found[0]
            if not p.get("no_stop_trim"):
                text = text[: text.find(matched)] if matched in text else text
            reason = {"type": "stop", "matched": matched}
        elif out.eos:
            token = min((engine.eos_ids | stop_ids) or {0})
            output_ids.append(token)  # SGLang keeps the stop token in output_ids
            reason = {"type": "stop", "matched": token}
        else:
            reason = {"type": "length", "length": max_new}
        meta = {"id": uuid.uuid4().hex, "finish_reason": reason, "prompt_tokens": len(ids)}
        meta |= {"completion_tokens": len(output_ids), "cached_tokens": out.cached_tokens}
        return {"text": text, "output_ids": output_ids, "meta_info": meta}

    def _prefill(self, ids: list[int], logprob: bool, start: int) -> dict[str, Any]:
        # Without logprobs the prompt is only prefilled (and cached), as SGLang does.
        first = start if logprob and start >= 0 else len(ids) - 1
        # The cache is reused for at most `first` tokens; ids[: first + 1] are stored.
        (scored,) = self.engine.answer_logprobs([(ids[: first + 1], ids[first + 1 :])])
        logprobs, cached = scored.values, scored.cached_tokens
        meta: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "finish_reason": {"type": "length", "length": 0},
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
            "cached_tokens": cached,
        }
        if logprob:
            entries: list[list[Any]] = []
            if start >= 0:
                entries.append([None, ids[first], None])
                entries += [[lp, t, None] for lp, t in zip(logprobs, ids[first + 1 :], strict=True)]
            meta["input_token_logprobs"] = entries
            meta["output_token_logprobs"] = []
        return {"text": "", "output_ids": [], "meta_info": meta}


class Handler(BaseHTTPRequestHandler):
    server: Any  # ThreadingHTTPServer with a `state`

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read results
        pass

    def _send(self, status: int, payload: Any = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"null")

    def do_GET(self) -> None:
        state: State = self.server.state
        if self.path in ("/health", "/health_generate"):
            self._send(200 if state.engine is not None else 503)
        elif self.path == "/get_model_info":
            self._send(200, {"model_path": state.args.model_path, "is_generation": True})
        elif self.path == "/server_info":
            if state.engine is None:
                self._send(503, {"error": {"message": "the server is starting"}})
            else:
                self._send(200, state.server_info())
        elif self.path == "/test/requests":
            self._send(200, {"requests": state.requests})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        state: State = self.server.state
        try:
            body = self._body()
        except ValueError as e:
            self._send(400, {"error": {"message": f"bad JSON: {e}"}})
            return
        if self.path == "/test/stall":
            state.stall_s = float(body.get("seconds", 0))
            self._send(200, {})
        elif self.path == "/test/hang":
            state.hang.set()
            self._send(200, {})
        elif self.path == "/test/nan":
            state.nan_next = True
            self._send(200, {})
        elif self.path == "/test/abort":
            state.abort_next = True
            self._send(200, {})
        elif self.path == "/generate":
            state.requests.append(body)
            if state.hang.is_set():
                threading.Event().wait()  # never answers; the process dies with it
            time.sleep(state.stall_s)
            if state.engine is None:
                self._send(503, {"error": {"message": "the server is starting"}})
                return
            nan, state.nan_next = state.nan_next, False
            abort, state.abort_next = state.abort_next, False
            try:
                self._send(200, state.generate(body, nan=nan, abort=abort))
            except Refused as e:
                self._send(400, {"error": {"message": str(e)}})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", "--tp", type=int, default=1)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context-length", type=int)
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--disable-radix-cache", action="store_true")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"sglang_testserver: ignoring {unknown}", file=sys.stderr, flush=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    state = State(args)
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]

    def load() -> None:
        # Like SGLang: the port answers (503) while the model loads.
        from cord.common.pools import HFSpec
        from cord.workers.engines.hf import HFEngine

        dtype = _DTYPES.get(args.dtype, "auto")
        spec = HFSpec(name="testserver", model=args.model_path, dtype=dtype)
        if args.disable_radix_cache:
            spec = spec.model_copy(update={"prefix_cache_tokens": 0})
        try:
            state.engine = HFEngine(spec)
        except Exception as e:  # a server that cannot load exits, as SGLang does
            print(f"sglang_testserver: cannot load {args.model_path}: {e!r}", file=sys.stderr)
            os._exit(1)
        print(f"sglang_testserver: ready on {args.host}:{args.port}", file=sys.stderr, flush=True)

    threading.Thread(target=load, daemon=True).start()
    httpd.serve_forever()


if __name__ == "__main__":
    main()
