"""``cord-coord eval``: the same problems through the live fleet once per strategy.

Each strategy runs with its own problem state (a namespace of its own under the run's)
and its own output folder, against the same workers and queues, one after the other, so
wall times compare. Curation's N (trajectories per teacher) and MCTS's token budget are
matched to the tokens CoRD generated on the same problems unless the config sets
`search.curation_samples` / `search.mcts_tokens`.
Reported per strategy: the figures of its rows (`rows.summarize`: accuracy, a failure
counting as wrong, as each row's `correct` says with the config's `eval.match`; mean S;
mean generated tokens per problem, every token any teacher generated for it; AUROC, how
well S separates right from wrong traces; ...) and the wall seconds of its whole run.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cord.common.config import RunConfig
from cord.common.keys import Keys
from cord.coordinator.driver import Coordinator
from cord.coordinator.fleet import wipe_namespace
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import FailureRow, TraceRow, summarize
from cord.coordinator.rundir import read_failures, read_traces
from cord.coordinator.search import lookup, strategy_of
from cord.coordinator.store import Store


@dataclass
class StrategyResult:
    strategy: str
    rows: list[TraceRow]
    failed: list[FailureRow]
    wall_s: float  # the strategy's whole run

    def metrics(self) -> dict[str, Any]:
        """The rows' figures (`rows.Summary`) and the run's wall seconds."""
        return {**summarize(self.rows, self.failed).model_dump(), "wall_s": round(self.wall_s, 2)}


def run_strategy(
    cfg: RunConfig, strategy: str, problems: list[Problem], out_dir: Path, tag: str
) -> StrategyResult:
    search = cfg.search.model_copy(update={"strategy": strategy})
    scfg = cfg.model_copy(update={"search": search})
    strategy_of(scfg)  # single:<teacher> names a teacher of the config, etc.
    state_ns = f"{cfg.namespace}:eval:{tag}:{strategy}"
    folder = out_dir / strategy.replace(":", "-")
    coord = Coordinator(scfg, str(folder), state_namespace=state_ns)
    client = coord.redis
    try:
        Store(client, Keys(state_ns)).enqueue(problems)
        start = time.monotonic()
        coord.run()
        wall = time.monotonic() - start
    finally:
        wipe_namespace(client, Keys(state_ns))
    rows, failed = read_traces(coord.writer.traces), read_failures(coord.writer.failed)
    return StrategyResult(strategy, rows, failed, wall)


def matched_curation_samples(cfg: RunConfig, cord: Sequence[TraceRow]) -> int:
    """N for curation: the smallest N whose generated tokens reach CoRD's (CoRD's tokens
    per problem over what one whole trajectory, thinking and answer, costs per teacher),
    so CoRD is compared with a curation that had at least its budget."""
    per_trace = [r.stats.thinking_tokens + r.stats.answer_tokens for r in cord]
    if not per_trace or sum(per_trace) == 0:
        return cfg.search.beam_width * cfg.search.samples_per_beam
    trace = sum(per_trace) / len(per_trace)
    tokens = summarize(cord).mean_generated_tokens or 0.0
    return max(1, math.ceil(tokens / (len(cfg.teachers) * trace) - 1e-9))


def matched_mcts_tokens(cord: Sequence[TraceRow]) -> int | None:
    """MCTS's budget: CoRD's mean generated tokens per problem."""
    tokens = summarize(cord).mean_generated_tokens
    return math.ceil(tokens) if tokens else None


def _matched(cfg: RunConfig, strategy: str, cord: StrategyResult) -> dict[str, int]:
    """The search settings that give `strategy` CoRD's budget, unless the config fixes
    them."""
    if strategy == "curation" and cfg.search.curation_samples is None:
        return {"curation_samples": matched_curation_samples(cfg, cord.rows)}
    if strategy == "mcts" and cfg.search.mcts_tokens is None:
        tokens = matched_mcts_tokens(cord.rows)
        return {"mcts_tokens": tokens} if tokens else {}
    return {}


def evaluate(
    cfg: RunConfig, problems: list[Problem], strategies: list[str], out_dir: Path
) -> dict[str, Any]:
    """Run each strategy in turn: CoRD first, then those whose budget is matched to
    CoRD's generated tokens (curation's N, MCTS's tokens) unless the config fixes it."""
    tag = uuid.uuid4().hex[:8]

    def matched(name: str) -> bool:
        found = lookup(name)
        return found is not None and found[0].matched_to_cord

    order = sorted(strategies, key=lambda s: (s != "cord", matched(s)))
    results: dict[str, StrategyResult] = {}
    report: dict[str, Any] = {}
    for strategy in order:
        run_cfg = cfg
        if matched(strategy) and "cord" in results:
            update = _matched(cfg, strategy, results["cord"])
            report.update(update)
            run_cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update=update)})
        results[strategy] = run_strategy(run_cfg, strategy, problems, out_dir, tag)
    report["strategies"] = {s: results[s].metrics() for s in strategies}
    every = [row for r in results.values() for row in r.rows]
    report["auroc_all"] = summarize(every).auroc
    report["problems"] = len(problems)
    report["out"] = str(out_dir)
    return report


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"{'strategy':<16} {'accuracy':>8} {'mean S':>8} {'tokens':>8} {'wall s':>8} "
        f"{'failed':>6} {'AUROC':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, m in report["strategies"].items():
        lines.append(
            f"{name:<16} {_fmt(m['accuracy'], '.3f')} {_fmt(m['mean_score'])} "
            f"{_fmt(m['mean_generated_tokens'], '.0f')} {m['wall_s']:>8.1f} {m['failed']:>6} "
            f"{_fmt(m['auroc'], '.3f', 6)}"
        )
    auroc_all = report["auroc_all"]
    lines.append(
        "S separates right from wrong final traces (all strategies): AUROC "
        + ("-" if auroc_all is None else f"{auroc_all:.4f}")
    )
    if "curation_samples" in report:
        lines.append(
            f"curation: {report['curation_samples']} trajectories per teacher "
            "(matched to CoRD's generated tokens)"
        )
    if "mcts_tokens" in report:
        lines.append(f"mcts: {report['mcts_tokens']} generated tokens per problem (CoRD's mean)")
    return "\n".join(lines)


def _fmt(x: float | None, spec: str = ".4f", width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"
