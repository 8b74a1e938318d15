"""The same search in one process: the engines called directly, no Redis, no Celery, no
messages on a wire (`fleet.py overhead`'s baseline). Each batch goes to its engine through
`cord.workers.engines.serve`, the dispatch a worker's task runs."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import click
from harness import FleetRun, percentile, process_cpu_s, r3, same_rows, tokens_of

from cord.common.config import RunConfig
from cord.common.messages import Score, TaskKind, TaskRequest
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import TraceRow
from cord.coordinator.search import Outcome, Search, Work, make_search
from cord.workers.engines import Engine, load_engine, serve


@dataclass
class InProcessRun:
    wall_s: float
    rows: list[TraceRow]
    calls: int
    cpu_s: float = 0.0


def load_engines(cfg: RunConfig) -> dict[str, Engine]:
    return {name: load_engine(cfg.pool(name)) for name in cfg.model_names}


def release_device_memory(device: str) -> None:
    """Give freed GPU memory back, so the fleet's workers started next can have it."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class InProcess:
    """The strategy of `cfg` on problems, the engines called directly. Batching follows
    `Coordinator`'s: up to ``max_in_flight`` problems at once; each round gathers all
    pending work of a (kind, model) and splits it into batches of that pool's
    ``max_batch``; results are fed back batch by batch and the new work waits for the
    next round."""

    def __init__(self, cfg: RunConfig, engines: dict[str, Engine]) -> None:
        self.cfg = cfg
        self.engines = engines
        self.searches: dict[str, Search] = {}
        self.outbox: dict[tuple[TaskKind, str], list[tuple[str, Work]]] = defaultdict(list)
        self.rows: list[TraceRow] = []
        self.calls = 0

    def run(self, problems: list[Problem]) -> InProcessRun:
        waiting = deque(problems)
        start, cpu = time.perf_counter(), process_cpu_s()
        while waiting or self.searches:
            while waiting and len(self.searches) < self.cfg.max_in_flight:
                p = waiting.popleft()
                self.searches[p.id] = make_search(p, self.cfg)
                self._apply(p.id, self.searches[p.id].start())
            if not self.outbox:
                raise RuntimeError(f"in-process run stalled with {len(self.searches)} open")
            current = dict(self.outbox)
            self.outbox.clear()
            for (kind, model), entries in current.items():
                size = self.cfg.pool(model).max_batch
                for i in range(0, len(entries), size):
                    self._batch(kind, model, entries[i : i + size])
        wall, cpu = time.perf_counter() - start, process_cpu_s() - cpu
        return InProcessRun(wall, self.rows, self.calls, cpu)

    def _batch(self, kind: TaskKind, model: str, chunk: list[tuple[str, Work]]) -> None:
        """One task's worth of items through the worker's dispatch, its results fed back."""
        items: dict[str, list[Any]] = {kind: [w.item for _, w in chunk]}
        request = TaskRequest(task_id=f"inproc-{self.calls}", kind=kind, model=model,
                              reply_to="", **items)  # fmt: skip
        self.calls += 1
        generations, scores = serve(self.engines[model], request)
        owner = {w.item.key: (pid, w) for pid, w in chunk}
        for result in [*generations, *scores]:
            pid, w = owner[result.key]
            search = self.searches.get(pid)
            if search is None:
                continue
            if result.error:
                raise RuntimeError(f"in-process {kind} of {result.key} failed: {result.error}")
            if isinstance(result, Score):
                self._apply(pid, search.on_score(w.key, result))
            else:
                self._apply(pid, search.on_generation(w.key, result))

    def _apply(self, pid: str, outcome: Outcome) -> None:
        for w in outcome.work:
            self.outbox[(w.kind, w.model)].append((pid, w))
        if outcome.row is not None:
            self.rows.append(outcome.row)
            del self.searches[pid]


def run_in_process(
    cfg: RunConfig,
    problems: list[Problem],
    engines: dict[str, Engine],
    strategy: str | None = None,
) -> InProcessRun:
    """`problems` with `cfg`'s strategy (or `strategy`) in this process."""
    if strategy is not None:
        search = cfg.search.model_copy(update={"strategy": strategy})
        cfg = cfg.model_copy(update={"search": search})
    return InProcess(cfg, engines).run(problems)


def baselines(
    by_threads: dict[int, RunConfig], todo: list[Problem], warm: list[Problem], device: str
) -> dict[int, InProcessRun]:
    """The one-process run with each config (one per torch thread count), each after an
    untimed warm-up; the engines are freed between them."""
    runs: dict[int, InProcessRun] = {}
    for threads, cfg in by_threads.items():
        engines = load_engines(cfg)
        if warm:
            run_in_process(cfg, warm, engines)
        runs[threads] = run_in_process(cfg, todo, engines)
        del engines
        release_device_memory(device)
        click.echo(f"one process, {threads} thread(s): {runs[threads].wall_s:.1f}s", err=True)
    return runs


def overhead_figures(inproc: dict[int, InProcessRun], run: FleetRun) -> dict[str, Any]:
    """The fleet's run against the fastest one-process run of the same problems."""
    best = min(inproc, key=lambda t: inproc[t].wall_s)
    base = inproc[best]
    figures: dict[str, Any] = {
        f"inprocess_threads{t}_wall_s": r3(r.wall_s) for t, r in inproc.items()
    }
    return figures | {
        "inprocess_wall_s": r3(base.wall_s),
        "inprocess_threads": best,
        "fleet_cord_wall_s": r3(run.wall_s),
        "fleet_overhead_ratio": r3(run.wall_s / base.wall_s),
        # The fleet may use every core, one process only its threads: its CPU seconds
        # (coordinator and workers) over the one process's show the cost more cores hide.
        "fleet_cpu_s": round(run.cpu_s, 2),
        "inprocess_cpu_s": round(base.cpu_s, 2),
        "fleet_cpu_overhead_ratio": r3(run.cpu_s / base.cpu_s) if base.cpu_s else None,
        "fleet_rows_same_as_inprocess": same_rows(run.rows, base.rows),
        "fleet_cord_done": len(run.rows),
        "fleet_cord_failed": run.failed,
        "cord_tokens_per_problem": round(tokens_of(run.rows), 1),
        "cord_step_latency_p50_s": r3(percentile(run.step_latencies, 50)),
        "cord_step_latency_p99_s": r3(percentile(run.step_latencies, 99)),
        "cord_tasks": run.summary.get("tasks_sent"),
        "cord_items": run.summary.get("items_sent"),
    }
