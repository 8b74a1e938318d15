"""The `sglang` engine: an SGLang server (launched and supervised, or attached; see
`server`) does the model work over its native ``/generate`` API.

The base (`base.BaseEngine`) builds the prompts and tokenizes them with the model's own
tokenizer, loaded locally, cuts stop strings and computes S, as for every engine; the
server gets token ids, never text (its radix cache is keyed on ids, and re-tokenizing
text can shift boundaries and lose hits: docs/method.md, "SGLang").
- A task's items go in one batched ``/generate`` call (``input_ids`` as a list of lists,
  ``sampling_params`` as a list), so SGLang schedules them together.
- Expansion: ``stop`` holds the step boundary strings, ``stop_token_ids`` the model's
  end-of-turn ids, ``max_new_tokens`` is always set (SGLang's default is 128), and each
  item's seed goes in ``sampling_seed`` (honoured only by a server started with
  ``--enable-deterministic-inference``: the server's ``/server_info`` is read at start
  and a warning logged when it is off, or when its radix cache is off). The text is
  decoded here from ``output_ids`` and cut before the first stop string by the base,
  exactly as for `hf`, whichever stop string the server names in ``matched`` (SGLang
  names the first of the ``stop`` list, not the first in the text). A ``matched``
  string that is not one of ours is SGLang's own "NaN happened" (NaN in the logits,
  the last id replaced by the eos id): a retryable error, never a step.
- Scoring: ``max_new_tokens: 0``, ``return_logprob`` and ``logprob_start_len`` at the
  last context token, so the context stays cached and only the answer's log-probs come
  back (the first returned entry is None).
- ``meta_info.prompt_tokens`` / ``cached_tokens`` feed the same counters as `hf`.

Errors come back per item: a prompt the server refuses as too long (HTTP 400; SGLang
fails the whole batch for it) is not retryable, and the batch is split in halves until
the others run; an aborted request (HTTP 200 with ``finish_reason {"type": "abort"}``),
a server that is down, restarting, times out or answers 5xx make the items retryable.
"""

from __future__ import annotations

import atexit
from typing import Any

from cord.common.pools import SGLangSpec
from cord.workers.engines.base import (
    AnswerLogprobs,
    BaseEngine,
    Done,
    EngineError,
    IdOutput,
    IdRequest,
)
from cord.workers.engines.server import RequestRejected, ServerSupervisor, request_json

# Some SGLang builds hold sampling seeds in int32 tensors; our seeds are 64-bit digests.
_SEED_MOD = 2**31
_PROBE = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}


def _is_length_error(message: str) -> bool:
    # SGLang 0.5.23, each an HTTP 400 for the whole batch: the tokenizer manager's
    # "The input (N tokens) is longer than the model's context length (C tokens)." (N >=
    # C) and "Requested token count exceeds the model's maximum context length of C
    # tokens. ..." (N + max_new_tokens > C); the scheduler's "Input length (N tokens)
    # exceeds the maximum allowed length (M tokens). ..." (N >= its max_req_input_len,
    # about C - 6, less when the KV pool is smaller) and "Request prompt exceeds the KV
    # memory budget: ...".
    lowered = message.lower()
    return (
        "context length" in lowered
        or "context_length" in lowered
        or "maximum allowed length" in lowered
        or "kv memory budget" in lowered
    )


class SGLangServer(ServerSupervisor):
    kind = "sglang"
    label = "SGLang"
    health_path = "/health_generate"

    def __init__(self, spec: SGLangSpec) -> None:
        super().__init__(spec)
        self.sglang = spec

    def command(self, port: int) -> list[str]:
        spec = self.sglang
        cmd = [
            *spec.sglang_launch,
            "--model-path",
            str(spec.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tp-size",
            str(spec.tp_size),
        ]
        if spec.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(spec.mem_fraction_static)]
        if spec.dtype != "auto":
            cmd += ["--dtype", spec.dtype]
        if spec.sglang_deterministic:
            cmd.append("--enable-deterministic-inference")
        return [*cmd, *spec.sglang_args]

    def probe_request(self) -> tuple[str, dict[str, Any], str]:
        return "/generate", _PROBE, "meta_info"


class SGLangEngine(BaseEngine):
    def __init__(self, spec: SGLangSpec) -> None:
        super().__init__(spec)
        self.server = SGLangServer(spec)
        self.server.start()
        atexit.register(self.close)
        self._check_server()

    def close(self) -> None:
        self.server.close()

    def _check_server(self) -> None:
        """A server started without --enable-deterministic-inference ignores
        `sampling_seed` (a re-sent item then writes other text), and one whose radix
        cache is off prefills every prefix again: read its /server_info (the resolved
        server arguments) and say so once."""
        try:
            status, info = request_json(
                "GET", self.server.url + "/server_info", timeout=self.spec.health_timeout_s
            )
        except OSError as e:
            self.server.log.warning("sglang_server_info_unread", error=str(e))
            return
        if status != 200 or not isinstance(info, dict):
            self.server.log.warning("sglang_server_info_unread", status=status)
            return
        if not info.get("enable_deterministic_inference"):
            self.server.log.warning(
                "sglang_seeds_ignored",
                url=self.server.url,
                why="the server runs without --enable-deterministic-inference: it ignores "
                "sampling_seed, so a re-sent item samples other text",
            )
        if info.get("disable_radix_cache"):
            self.server.log.warning(
                "sglang_radix_cache_off",
                url=self.server.url,
                attention_backend=info.get("attention_backend"),
                why="the server's radix cache is off: every step prefills its whole prefix "
                "(deterministic inference on Blackwell defaults to flashinfer, which turns "
                "it off; --attention-backend triton keeps it)",
            )

    # -- the wire -------------------------------------------------------------------
    def _run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | EngineError]:
        """Send single-item request bodies as one batched /generate call; per request
        the server's answer or the error it gets."""
        body: dict[str, Any] = {key: [r[key] for r in requests] for key in requests[0]}
        try:
            answer = self.server.post("/generate", body)
        except RequestRejected as e:
            if _is_length_error(e.message):
                if len(requests) > 1:  # SGLang refuses the whole batch: find the long ones
                    half = len(requests) // 2
                    return self._run(requests[:half]) + self._run(requests[half:])
                return [EngineError(f"SGLang: {e.message}", retryable=False)]
            return [EngineError(f"SGLang refused the request: {e}", retryable=True)] * len(requests)
        except EngineError as e:
            return [e] * len(requests)
        if isinstance(answer, dict) and len(requests) == 1:
            answer = [answer]
        if not isinstance(answer, list) or len(answer) != len(requests):
            error = EngineError(
                f"SGLang answered {len(requests)} requests with {answer!r:.200}", True
            )
            return [error] * len(requests)
        out: list[dict[str, Any] | EngineError] = []
        for a in answer:
            if not isinstance(a, dict):
                out.append(EngineError(f"bad answer {a!r:.200}", True))
                continue
            reason = (a.get("meta_info") or {}).get("finish_reason") or {}
            if reason.get("type") == "abort":  # the server gave up on it: try again
                message = reason.get("message")
                out.append(EngineError(f"SGLang aborted the request: {message}", True))
                continue
            out.append(a)
        return out

    # -- generation -----------------------------------------------------------------
    def _sampling_params(self, r: IdRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_new_tokens": r.max_new,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "stop_token_ids": sorted(self.eos_ids),
            "sampling_seed": r.seed % _SEED_MOD,
            # Stop strings are matched on decoded text; a template whose </think> is a
            # special token would never match it with special tokens skipped (hf keeps them).
            "skip_special_tokens": False,
        }
        if r.stops:
            params["stop"] = list(r.stops)
        return params

    def generate_ids(
        self,
        requests: list[IdRequest],
        done: Done | None = None,  # not called: a task's items go in one request
    ) -> list[IdOutput | EngineError]:
        bodies = [
            {"input_ids": r.ids, "sampling_params": self._sampling_params(r)} for r in requests
        ]
        return [
            out if isinstance(out, EngineError) else self._output(r, out)
            for r, out in zip(requests, self._run(bodies), strict=True)
        ]

    def _output(self, r: IdRequest, out: dict[str, Any]) -> IdOutput | EngineError:
        meta = out.get("meta_info") or {}
        reason = meta.get("finish_reason") or {}
        kind, matched = reason.get("type"), reason.get("matched")
        if kind == "stop" and isinstance(matched, str) and matched not in r.stops:
            # SGLang's own stop: "NaN happened" (a token id out of the vocabulary, NaN in
            # the logits; the id was replaced by the eos id). No step, no end of turn.
            return EngineError(f"SGLang ended the generation with {matched!r}", retryable=True)
        ids = [int(t) for t in out.get("output_ids") or []]
        by_token = kind == "stop" and isinstance(matched, int) and not isinstance(matched, bool)
        if by_token and ids and ids[-1] == matched:
            ids.pop()  # hf neither counts nor decodes the end-of-turn token
        text = None
        if kind == "stop" and isinstance(matched, str):
            # The server's cut, for when decoding here does not show the stop string. It
            # names the first of our stop strings in list order; cut at the first in the
            # text, as the base does.
            text = str(out.get("text", ""))
            found = [(text.find(s), s) for s in r.stops if s in text]
            if found:
                at, matched = min(found)
                text = text[:at]
        return IdOutput(
            ids,
            int(meta.get("prompt_tokens", len(r.ids))),
            int(meta.get("cached_tokens") or 0),
            eos=by_token,
            matched=matched if text is not None else None,
            text=text,
        )

    # -- scoring --------------------------------------------------------------------
    def answer_logprobs(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[AnswerLogprobs | EngineError]:
        requests = [
            {
                "input_ids": context + target,
                # Temperature 1: some SGLang builds scale returned log-probs by it.
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                "return_logprob": True,
                # Log-probs from the last context token on: the context stays in the
                # radix cache (it is reused only up to here), and the first entry, the
                # context token itself, comes back as None.
                "logprob_start_len": len(context) - 1,
            }
            for context, target in pairs
        ]
        out: list[AnswerLogprobs | EngineError] = []
        for (context, target), answer in zip(pairs, self._run(requests), strict=True):
            out.append(
                answer
                if isinstance(answer, EngineError)
                else self._logprobs(context, target, answer)
            )
        return out

    def _logprobs(
        self, context: list[int], target: list[int], out: dict[str, Any]
    ) -> AnswerLogprobs | EngineError:
        meta = out.get("meta_info") or {}
        entries = meta.get("input_token_logprobs") or []
        tail = entries[len(entries) - len(target) :] if len(entries) >= len(target) else []
        # Each entry is [logprob, token_id, text]; the answer's tokens are the last ones.
        if len(tail) != len(target) or any(
            e[0] is None or int(e[1]) != t for e, t in zip(tail, target, strict=True)
        ):
            return EngineError(
                f"SGLang returned log-probs for other tokens than the answer's {target} "
                f"({entries!r:.300}); does the server run model {self.spec.model!r}?",
                retryable=False,
            )
        return AnswerLogprobs(
            [float(e[0]) for e in tail],
            int(meta.get("prompt_tokens", len(context) + len(target))),
            int(meta.get("cached_tokens") or 0),
        )

    def runtime_stats(self) -> dict[str, Any]:
        return {"server_url": self.server.url, "server_restarts": self.server.restarts}
