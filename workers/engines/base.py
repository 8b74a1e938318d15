"""The engine base: everything the runtimes share, held once.

A runtime (`hf`, `sglang`, `vllm`) implements two things at the level of token ids:

- `generate_ids`: continue each prompt (ids) until one of its stop strings, an end-of-turn
  id or its token budget; per request the new ids, and the prompt tokens the runtime's
  prefix cache served;
- `answer_logprobs`: per (context, answer) pair of ids, the log-probability of each
  answer token given the context and the answer tokens before it.

The base does the rest, the same way for every runtime, so pools of any engine are
interchangeable: the model's tokenizer and chat template (`prompts.chat_prefix`), the
end-of-turn ids, the context check, the texts an expansion, an answer or a score
continues (`expand_texts`, `answer_texts`, `prompts.scoring_context`), the cut at the
first stop string and the finish reason, S (`predictive_score`), per-item errors and
the counters behind `stats()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from cord.common import prompts
from cord.common.messages import (
    AnswerItem,
    EngineStats,
    ExpandItem,
    FinishReason,
    Generation,
    Score,
    ScoreItem,
)
from cord.common.pools import AnyModelSpec
from cord.common.scoring import predictive_score

# Where a streaming engine hands over finished items (`cord.workers.engines.Emit`).
Emit = Callable[[list[Any]], None]


class EngineError(RuntimeError):
    """An item the engine cannot serve. `retryable` says whether another try (maybe on
    another worker) could succeed."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class IdRequest:
    """One generation at the level of ids."""

    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    seed: int
    stops: tuple[str, ...]


@dataclass
class IdOutput:
    """What a runtime generated for one `IdRequest`. `ids` never hold the end-of-turn id
    that ended the row (`eos` says it did); they may hold the token that completed a stop
    string. `matched` and `text`: a server's own cut at one of the request's stop strings,
    for the rare case where decoding `ids` here does not show the string."""

    ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    eos: bool = False
    matched: str | None = None
    text: str | None = None


# A runtime's call as one request of `generate_ids` ends: (its index, its output).
Done = Callable[[int, "IdOutput | EngineError"], None]


@dataclass
class AnswerLogprobs:
    """The answer's log-probabilities after one context, and what the prompt cost."""

    values: list[float]
    prompt_tokens: int
    cached_tokens: int


def expand_texts(
    prefix: Callable[[str], str], items: list[ExpandItem]
) -> tuple[list[str], list[tuple[str, ...]]]:
    """What each expansion continues (`prefix`: the model's chat prefix of a user turn)
    and where it stops: one step at the next header, a whole trajectory only at
    </think>."""
    texts = [prefix(i.prompt) + prompts.think_body(i.steps, i.next_step) for i in items]
    stops = [(prompts.THINK_CLOSE,) if i.whole else prompts.STEP_STOPS for i in items]
    return texts, stops


def answer_texts(prefix: Callable[[str], str], items: list[AnswerItem]) -> list[str]:
    """What each final answer continues: the closed thinking block of its steps."""
    return [prefix(i.prompt) + prompts.answer_context(i.steps) for i in items]


def eos_ids(*values: Any) -> set[int]:
    """The end-of-turn token ids among `values` (ints, lists of ints or None), as the
    generation config and the tokenizer give them; every engine stops at the same ones."""
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def check_context(model: str, max_context: int | None, n: int) -> None:
    """A request of `n` tokens must fit the model's context: a fatal item error if not."""
    if max_context is not None and n > max_context:
        raise EngineError(
            f"{n} tokens exceed the context of model {model!r} ({max_context}); "
            "lower search.thinking_budget or use a model with a longer context",
            retryable=False,
        )


def finish_of(stop: str) -> FinishReason:
    return "think_end" if stop == prompts.THINK_CLOSE else "step"


class BaseEngine:
    """The shared half of every engine; subclasses implement `generate_ids` and
    `answer_logprobs` (and may add to `runtime_stats`)."""

    max_context: int | None  # tokens a request may hold (prompt + new); None: unknown
    # A runtime whose requests finish apart (one HTTP request per item) sets this and
    # calls `generate_ids`' `done` as each ends: the worker replies per item then.
    streams = False

    def __init__(self, spec: AnyModelSpec) -> None:
        assert spec.model is not None  # RunConfig guarantees it
        self.name = spec.name
        self.spec = spec
        self.tokenizer: Any = AutoTokenizer.from_pretrained(spec.model)
        config = AutoConfig.from_pretrained(spec.model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = getattr(text, "max_position_embeddings", None) or getattr(
            text, "n_positions", None
        )
        limit = getattr(spec, "max_model_len", None)  # a server's own context (vllm)
        if limit is not None:
            self.max_context = min(self.max_context or limit, limit)
        try:
            gen_eos = GenerationConfig.from_pretrained(spec.model).eos_token_id
        except OSError:  # no generation_config.json: the model config's own
            gen_eos = getattr(config, "eos_token_id", None)
        self.eos_ids = eos_ids(gen_eos, self.tokenizer.eos_token_id)
        self.counters = EngineStats()  # what `stats()` reports, less the runtime's figures
        # A server engine's worker runs several tasks at once (`concurrency`): the
        # counters and the tokenizer (a Rust object behind a borrow check) are shared.
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._running = 0  # engine calls running now
        self._running_since = 0.0
        self._prefix = lru_cache(maxsize=4096)(self._chat_prefix)

    # -- what a runtime implements -------------------------------------------------
    def generate_ids(
        self, requests: list[IdRequest], done: Done | None = None
    ) -> list[IdOutput | EngineError]:
        """Every request's output; a runtime that `streams` calls `done(index, output)`
        as each one ends, before it returns them all."""
        raise NotImplementedError

    def answer_logprobs(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[AnswerLogprobs | EngineError]:
        raise NotImplementedError

    def runtime_stats(self) -> dict[str, Any]:
        return {}

    # -- text and tokens -----------------------------------------------------------
    def _chat_prefix(self, user: str) -> str:
        return prompts.chat_prefix(self.tokenizer, user)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts in one tokenizer call (its per-call cost is most of
        a short text's)."""
        if not texts:
            return []
        with self._tokenizer_lock:
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def check_context(self, n: int) -> None:
        check_context(self.name, self.max_context, n)

    def cut(self, ids: list[int], stops: tuple[str, ...]) -> tuple[str, FinishReason | None]:
        """The text of `ids` before its first stop string, and which kind of stop it was
        (None: no stop string in it)."""
        text = self.decode(ids)
        found = [(text.find(s), s) for s in stops if s in text]
        if not found:
            return text, None
        at, stop = min(found)
        return text[:at], finish_of(stop)

    @contextmanager
    def _call(self, items: int) -> Iterator[None]:
        """Count one engine call of `items` items: its time, and the time during which
        any call ran (the share of wall time a server had work: `busy_wall_s`)."""
        with self._lock:
            start = time.perf_counter()
            if self._running == 0:
                self._running_since = start
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                now = time.perf_counter()
                self.counters.requests += items
                self.counters.busy_s += now - start
                self._running -= 1
                if self._running == 0:
                    self.counters.busy_wall_s += now - self._running_since

    # -- the engine interface ------------------------------------------------------
    def expand(self, items: list[ExpandItem], emit: Emit | None = None) -> list[Generation]:
        with self._call(len(items)):
            return self._generate_items(items, *expand_texts(self._prefix, items), emit)

    def answer(self, items: list[AnswerItem], emit: Emit | None = None) -> list[Generation]:
        with self._call(len(items)):
            texts = answer_texts(self._prefix, items)
            return self._generate_items(items, texts, [()] * len(items), emit)

    def _generate_items(
        self,
        items: list[ExpandItem] | list[AnswerItem],
        texts: list[str],
        stops: list[tuple[str, ...]],
        emit: Emit | None = None,
    ) -> list[Generation]:
        results: list[Generation | None] = [None] * len(items)
        ready: list[int] = []
        requests: list[IdRequest] = []
        for index, (item, ids) in enumerate(zip(items, self.encode_many(texts), strict=True)):
            try:
                self.check_context(len(ids) + item.max_new_tokens)
            except EngineError as e:
                results[index] = Generation(key=item.key, error=str(e), retryable=e.retryable)
                continue
            ready.append(index)
            requests.append(
                IdRequest(
                    ids,
                    item.max_new_tokens,
                    item.temperature,
                    item.top_p,
                    item.seed,
                    stops[index],
                )
            )

        def finished(k: int, out: IdOutput | EngineError) -> Generation:
            index = ready[k]
            key = items[index].key
            if isinstance(out, EngineError):
                gen = Generation(key=key, error=str(out), retryable=out.retryable)
            else:
                gen = self._generation(key, requests[k], out)
            results[index] = gen
            return gen

        def streamed(k: int, out: IdOutput | EngineError) -> None:
            assert emit is not None
            emit([finished(k, out)])

        outs = self.generate_ids(requests, done=streamed if emit else None) if requests else []
        for k, out in enumerate(outs):
            if results[ready[k]] is None:  # not handed over as it ended
                finished(k, out)
        return [r for r in results if r is not None]

    def _generation(self, key: str, request: IdRequest, out: IdOutput) -> Generation:
        text, finish = self.cut(out.ids, request.stops)
        if finish is None and out.matched in request.stops:
            # The server saw one of our stop strings that decoding here does not show.
            text, finish = (text if out.text is None else out.text), finish_of(out.matched)
        if finish is None:
            finish = "eos" if out.eos else "length"
        with self._lock:
            tokens = self.counters.tokens
            tokens.prompt += out.prompt_tokens
            tokens.cached += out.cached_tokens
            tokens.generated += len(out.ids)
        return Generation(
            key=key,
            text=text,
            finish=finish,
            tokens=len(out.ids),
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens,
        )

    def score(self, items: list[ScoreItem], emit: Emit | None = None) -> list[Score]:
        """S of each item's reference answer after its trajectory (docs/method.md, step 4).
        Scores come back together (`emit` unused): a step's selection waits for all of
        them anyway, and each is one short pass over a cached context."""
        with self._call(len(items)):
            return self._scores(items)

    def _scores(self, items: list[ScoreItem]) -> list[Score]:
        results: list[Score | None] = [None] * len(items)
        contexts = self.encode_many(
            [self._prefix(i.prompt) + prompts.scoring_context(i.steps) for i in items]
        )
        targets = self.encode_many([prompts.answer_target(i.answer) for i in items])
        ready: list[int] = []
        for index, (item, context, target) in enumerate(zip(items, contexts, targets, strict=True)):
            try:
                if not target:
                    raise EngineError(
                        "the reference answer is empty under this tokenizer", retryable=False
                    )
                self.check_context(len(context) + len(target))
            except EngineError as e:
                results[index] = Score(key=item.key, error=str(e), retryable=e.retryable)
                continue
            ready.append(index)
        pairs = [(contexts[i], targets[i]) for i in ready]
        outs = self.answer_logprobs(pairs) if pairs else []
        for index, (_, target), out in zip(ready, pairs, outs, strict=True):
            key = items[index].key
            if isinstance(out, AnswerLogprobs) and len(out.values) != len(target):
                out = EngineError(
                    f"{len(out.values)} log-probabilities for an answer of {len(target)} "
                    f"tokens; does the server run model {self.spec.model!r}?",
                    retryable=False,
                )
            if isinstance(out, EngineError):
                results[index] = Score(key=key, error=str(out), retryable=out.retryable)
                continue
            with self._lock:
                tokens = self.counters.tokens
                tokens.prompt += out.prompt_tokens
                tokens.cached += out.cached_tokens
                tokens.scored += len(out.values)
            results[index] = Score(
                key=key,
                score=predictive_score(out.values),
                answer_tokens=len(out.values),
                prompt_tokens=out.prompt_tokens,
                cached_tokens=out.cached_tokens,
            )
        return [r for r in results if r is not None]

    def stats(self) -> EngineStats:
        with self._lock:
            stats = self.counters.model_copy(deep=True)
            if self._running:  # the call running now counts up to now
                stats.busy_wall_s += time.perf_counter() - self._running_since
        stats.busy_s = round(stats.busy_s, 3)
        stats.busy_wall_s = round(stats.busy_wall_s, 3)
        return stats.model_copy(update=self.runtime_stats())
