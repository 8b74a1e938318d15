"""Engines: the small interface a worker drives (expand, answer, score, stats), one
module per runtime on one base (`base.BaseEngine`). An engine knows prompts and tokens,
never beams."""

from __future__ import annotations

from typing import Protocol

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
from cord.workers.engines.base import EngineError

__all__ = ["Engine", "EngineError", "load_engine", "serve"]


class Engine(Protocol):
    name: str

    def expand(self, items: list[ExpandItem]) -> list[Generation]: ...

    def answer(self, items: list[AnswerItem]) -> list[Generation]: ...

    def score(self, items: list[ScoreItem]) -> list[Score]: ...

    def stats(self) -> EngineStats: ...


def serve(engine: Engine, req: TaskRequest) -> tuple[list[Generation], list[Score]]:
    """The engine call a task makes: its expansions, its final answers or its scoring.
    A worker's task runs this (`WorkerRuntime.handle`), and so does the benchmarks'
    one-process baseline."""
    if req.kind == "expand":
        return engine.expand(req.expand), []
    if req.kind == "answer":
        return engine.answer(req.answer), []
    return [], engine.score(req.score)


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
    # Placeholder text at once, for overhead benchmarks only (ops/bench/).
    from cord.workers.engines.bench import BenchEngine

    return BenchEngine(spec)
