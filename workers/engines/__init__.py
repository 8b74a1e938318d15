"""Engines: the small interface a worker drives (expand, answer, score, stats), one
module per runtime. An engine knows prompts and tokens, never beams."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from cord.common import prompts
from cord.common.config import ModelSpec
from cord.common.messages import AnswerItem, ExpandItem, Generation, Score, ScoreItem


class Engine(Protocol):
    name: str

    def expand(self, items: list[ExpandItem]) -> list[Generation]: ...

    def answer(self, items: list[AnswerItem]) -> list[Generation]: ...

    def score(self, items: list[ScoreItem]) -> list[Score]: ...

    def stats(self) -> dict[str, Any]: ...


class EngineError(RuntimeError):
    """An item the engine cannot serve. `retryable` says whether another try (maybe on
    another worker) could succeed."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


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


def load_engine(spec: ModelSpec) -> Engine:
    if spec.engine == "hf":
        from cord.workers.engines.hf import HFEngine

        return HFEngine(spec)
    if spec.engine == "sglang":
        # Imported here: the base install never needs it, and it never imports sglang
        # itself (it talks HTTP to a server it launches or attaches to).
        from cord.workers.engines.sglang import SGLangEngine

        return SGLangEngine(spec)
    if spec.engine == "bench":
        # Placeholder text at once, for overhead benchmarks only (ops/bench/).
        from cord.workers.engines.bench import BenchEngine

        return BenchEngine(spec)
    raise ValueError(f"engine {spec.engine!r} is not available; set `engine: hf`")
