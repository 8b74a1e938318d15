"""Engines: the small interface a worker drives (expand, answer, score, stats), one
module per runtime on one base (`base.BaseEngine`). An engine knows prompts and tokens,
never beams."""

from __future__ import annotations

from typing import Any, Protocol

from cord.common.messages import (
    AnswerItem,
    EngineStats,
    ExpandItem,
    Generation,
    Score,
    ScoreItem,
    TaskRequest,
)
from cord.common.pools import AnyModelSpec
from cord.workers.engines.base import Emit, EngineError

__all__ = ["Emit", "Engine", "EngineError", "load_engine", "serve"]


class Engine(Protocol):
    name: str

    def expand(self, items: list[ExpandItem]) -> list[Generation]: ...

    def answer(self, items: list[AnswerItem]) -> list[Generation]: ...

    def score(self, items: list[ScoreItem]) -> list[Score]: ...

    def stats(self) -> EngineStats: ...


def serve(
    engine: Engine, req: TaskRequest, emit: Emit | None = None
) -> tuple[list[Generation], list[Score]]:
    """The engine call a task makes: its expansions, its final answers or its scoring.
    A worker's task runs this (`WorkerRuntime.handle`), and so does the benchmarks'
    one-process baseline. An engine that finishes items at different times (``streams``)
    hands finished ones to `emit` on the way; the call still returns them all."""
    call: Any = engine
    kw = {"emit": emit} if emit is not None and getattr(engine, "streams", False) else {}
    if req.kind == "expand":
        return call.expand(req.expand, **kw), []
    if req.kind == "answer":
        return call.answer(req.answer, **kw), []
    return [], call.score(req.score, **kw)


def load_engine(spec: AnyModelSpec) -> Engine:
    # Each runtime is imported only when a pool uses it: the base install never needs
    # sglang or vllm (their engines talk HTTP to a server they launch or attach to).
    if spec.engine == "hf":
        from cord.workers.engines.hf import HFEngine

        return HFEngine(spec)
    if spec.engine == "sglang":
        from cord.workers.engines.sglang import SGLangEngine

        return SGLangEngine(spec)
    if spec.engine == "vllm":
        from cord.workers.engines.vllm import VLLMEngine

        return VLLMEngine(spec)
    if spec.engine == "sim":  # a simulated GPU, for cost benchmarks only (ops/bench/)
        from cord.workers.engines.sim import SimEngine

        return SimEngine(spec)
    # Placeholder text at once, for overhead benchmarks only (ops/bench/).
    from cord.workers.engines.bench import BenchEngine

    return BenchEngine(spec)
