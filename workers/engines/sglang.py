"""The `sglang` engine: an SGLang server (launched and supervised, or attached; see
`sglang_server`) does the model work over its native ``/generate`` API.

The engine keeps the `hf` engine's semantics, so pools of either kind are
interchangeable:

- Prompts are built the same way (`prompts.chat_prefix`, `think_body`, `answer_context`,
  `scoring_context`, `answer_target`) and tokenized here, with the model's own tokenizer
  loaded locally; the server gets token ids, never text (its radix cache is keyed on
  ids, and re-tokenizing text can shift boundaries and lose hits: runtime-facts).
- A task's items go in one batched ``/generate`` call (``input_ids`` as a list of lists,
  ``sampling_params`` as a list), so SGLang schedules them together.
- Expansion: ``stop`` holds the step boundary strings, ``stop_token_ids`` the model's
  end-of-turn ids, ``max_new_tokens`` is always set (SGLang's default is 128), and each
  item's seed goes in ``sampling_seed``. The text is decoded here from ``output_ids``
  and cut before the first stop string, exactly as `hf` cuts it; the finish reason is
  ``step`` / ``think_end`` (which stop string), ``eos`` (a stop token id) or ``length``.
- Scoring: ``max_new_tokens: 0``, ``return_logprob`` and ``logprob_start_len`` at the
  last context token, so the context stays cached and only the answer's log-probs come
  back (the first returned entry is None); S = `predictive_score` of those.
- ``meta_info.prompt_tokens`` / ``cached_tokens`` feed the same counters as `hf`.

Errors come back per item: a prompt longer than the model's context is not retryable;
a server that is down, restarting, times out or answers 5xx makes the items retryable.
"""

from __future__ import annotations

import atexit
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from cord.common import prompts
from cord.common.config import ModelSpec
from cord.common.messages import AnswerItem, ExpandItem, FinishReason, Generation, Score, ScoreItem
from cord.common.scoring import predictive_score
from cord.workers.engines import (
    EngineError,
    answer_texts,
    check_context,
    eos_ids,
    expand_texts,
)
from cord.workers.engines.sglang_server import RequestRejected, SGLangServer

# Some SGLang builds hold sampling seeds in int32 tensors; our seeds are 64-bit digests.
_SEED_MOD = 2**31


@dataclass
class _Counters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    busy_s: float = 0.0


def _is_context_error(message: str) -> bool:
    # SGLang: "The input (N tokens) is longer than the model's context length (M tokens)."
    # and "Requested token count exceeds the model's maximum context length of M ...".
    lowered = message.lower()
    return "context length" in lowered or "context_length" in lowered


class SGLangEngine:
    def __init__(self, spec: ModelSpec) -> None:
        self.name = spec.name
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        config = AutoConfig.from_pretrained(spec.model)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context: int | None = getattr(
            text_config, "max_position_embeddings", None
        ) or getattr(text_config, "n_positions", None)
        self.eos_ids = self._eos_ids(config)
        self.counters = _Counters()
        self._prefix = lru_cache(maxsize=4096)(self._chat_prefix)
        self.server = SGLangServer(spec)
        self.server.start()
        atexit.register(self.close)

    def close(self) -> None:
        self.server.close()

    # -- text and tokens ------------------------------------------------------------
    def _eos_ids(self, config: Any) -> set[int]:
        """The model's end-of-turn ids, as `hf` reads them (generation config, tokenizer)."""
        try:
            gen_eos = GenerationConfig.from_pretrained(self.spec.model).eos_token_id
        except OSError:  # no generation_config.json: the model config's own
            gen_eos = getattr(config, "eos_token_id", None)
        return eos_ids(gen_eos, self.tokenizer.eos_token_id)

    def _chat_prefix(self, user: str) -> str:
        return prompts.chat_prefix(self.tokenizer, user)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def _check_context(self, n: int) -> None:
        check_context(self.name, self.max_context, n)

    # -- the wire -------------------------------------------------------------------
    def _run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | EngineError]:
        """Send single-item request bodies as one batched /generate call; per request
        the server's answer or the error it gets."""
        body: dict[str, Any] = {key: [r[key] for r in requests] for key in requests[0]}
        try:
            answer = self.server.post("/generate", body)
        except RequestRejected as e:
            if _is_context_error(e.message):
                if len(requests) > 1:  # SGLang refuses the whole batch: find the long ones
                    return [out for r in requests for out in self._run([r])]
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
        return [
            a if isinstance(a, dict) else EngineError(f"bad answer {a!r:.200}", True)
            for a in answer
        ]

    # -- generation -----------------------------------------------------------------
    def expand(self, items: list[ExpandItem]) -> list[Generation]:
        return self._generate_items(items, *expand_texts(self._prefix, items))

    def answer(self, items: list[AnswerItem]) -> list[Generation]:
        return self._generate_items(items, answer_texts(self._prefix, items), [()] * len(items))

    def _sampling_params(self, item: ExpandItem | AnswerItem, stops: tuple[str, ...]) -> dict:
        params: dict[str, Any] = {
            "max_new_tokens": item.max_new_tokens,
            "temperature": item.temperature,
            "top_p": item.top_p,
            "stop_token_ids": sorted(self.eos_ids),
            "sampling_seed": item.seed % _SEED_MOD,
            # Stop strings are matched on decoded text; a template whose </think> is a
            # special token would never match it with special tokens skipped (hf keeps them).
            "skip_special_tokens": False,
        }
        if stops:
            params["stop"] = list(stops)
        return params

    def _generate_items(
        self, items: list[Any], texts: list[str], stops: list[tuple[str, ...]]
    ) -> list[Generation]:
        start = time.perf_counter()
        results: list[Generation | None] = [None] * len(items)
        batch: list[tuple[int, list[int]]] = []
        for index, (item, text) in enumerate(zip(items, texts, strict=True)):
            ids = self.encode(text)
            try:
                self._check_context(len(ids) + item.max_new_tokens)
            except EngineError as e:
                results[index] = Generation(key=item.key, error=str(e), retryable=e.retryable)
                continue
            batch.append((index, ids))
        if batch:
            requests = [
                {"input_ids": ids, "sampling_params": self._sampling_params(items[i], stops[i])}
                for i, ids in batch
            ]
            for (index, ids), out in zip(batch, self._run(requests), strict=True):
                item = items[index]
                if isinstance(out, EngineError):
                    results[index] = Generation(
                        key=item.key, error=str(out), retryable=out.retryable
                    )
                else:
                    results[index] = self._generation(item.key, ids, stops[index], out)
        self.counters.requests += len(items)
        self.counters.busy_s += time.perf_counter() - start
        return [r for r in results if r is not None]

    def _cut(self, ids: list[int], stops: tuple[str, ...]) -> tuple[str, FinishReason | None]:
        """The text of `ids` before its first stop string, and which kind of stop it was
        (None: no stop string in it); the `hf` engine's rule."""
        text = self.decode(ids)
        found = [(text.find(s), s) for s in stops if s in text]
        if not found:
            return text, None
        cut, stop = min(found)
        return text[:cut], "think_end" if stop == prompts.THINK_CLOSE else "step"

    def _generation(
        self, key: str, ids: list[int], stops: tuple[str, ...], out: dict[str, Any]
    ) -> Generation:
        meta = out.get("meta_info") or {}
        reason = meta.get("finish_reason") or {}
        kind, matched = reason.get("type"), reason.get("matched")
        if kind == "abort":
            return Generation(
                key=key,
                error=f"SGLang aborted the request: {reason.get('message')}",
                retryable=True,
            )
        output_ids = [int(t) for t in out.get("output_ids") or []]
        by_token = kind == "stop" and isinstance(matched, int) and not isinstance(matched, bool)
        if by_token and output_ids and output_ids[-1] == matched:
            output_ids.pop()  # hf neither counts nor decodes the end-of-turn token
        text, finish = self._cut(output_ids, stops)
        if finish is None:
            finish = "eos" if by_token else "length"
            if kind == "stop" and isinstance(matched, str):
                # The server saw a stop string our decoding does not show: trust its cut.
                text = str(out.get("text", text))
                finish = "think_end" if matched == prompts.THINK_CLOSE else "step"
        prompt_tokens = int(meta.get("prompt_tokens", len(ids)))
        cached = int(meta.get("cached_tokens") or 0)
        self.counters.prompt_tokens += prompt_tokens
        self.counters.cached_tokens += cached
        self.counters.generated_tokens += len(output_ids)
        return Generation(
            key=key,
            text=text,
            finish=finish,
            tokens=len(output_ids),
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
        )

    # -- scoring --------------------------------------------------------------------
    def score(self, items: list[ScoreItem]) -> list[Score]:
        start = time.perf_counter()
        results: list[Score | None] = [None] * len(items)
        batch: list[tuple[int, list[int], list[int]]] = []
        for index, item in enumerate(items):
            context = self.encode(self._prefix(item.prompt) + prompts.scoring_context(item.steps))
            target = self.encode(prompts.answer_target(item.answer))
            try:
                if not target:
                    raise EngineError(
                        "the reference answer is empty under this tokenizer", retryable=False
                    )
                self._check_context(len(context) + len(target))
            except EngineError as e:
                results[index] = Score(key=item.key, error=str(e), retryable=e.retryable)
                continue
            batch.append((index, context, target))
        if batch:
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
                for _, context, target in batch
            ]
            for (index, context, target), out in zip(batch, self._run(requests), strict=True):
                key = items[index].key
                if isinstance(out, EngineError):
                    results[index] = Score(key=key, error=str(out), retryable=out.retryable)
                    continue
                try:
                    results[index] = self._score(key, context, target, out)
                except EngineError as e:
                    results[index] = Score(key=key, error=str(e), retryable=e.retryable)
        self.counters.requests += len(items)
        self.counters.busy_s += time.perf_counter() - start
        return [r for r in results if r is not None]

    def _score(self, key: str, context: list[int], target: list[int], out: dict) -> Score:
        meta = out.get("meta_info") or {}
        entries = meta.get("input_token_logprobs") or []
        tail = entries[len(entries) - len(target) :] if len(entries) >= len(target) else []
        # Each entry is [logprob, token_id, text]; the answer's tokens are the last ones.
        if len(tail) != len(target) or any(
            e[0] is None or int(e[1]) != t for e, t in zip(tail, target, strict=True)
        ):
            raise EngineError(
                f"SGLang returned log-probs for other tokens than the answer's {target} "
                f"({entries!r:.300}); does the server run model {self.spec.model!r}?",
                retryable=False,
            )
        logprobs = [float(e[0]) for e in tail]
        prompt_tokens = int(meta.get("prompt_tokens", len(context) + len(target)))
        cached = int(meta.get("cached_tokens") or 0)
        self.counters.prompt_tokens += prompt_tokens
        self.counters.cached_tokens += cached
        self.counters.scored_tokens += len(target)
        return Score(
            key=key,
            score=predictive_score(logprobs),
            answer_tokens=len(logprobs),
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
        )

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "requests": c.requests,
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "generated_tokens": c.generated_tokens,
            "scored_tokens": c.scored_tokens,
            "busy_s": round(c.busy_s, 3),
            "server_url": self.server.url,
            "server_restarts": self.server.restarts,
        }
