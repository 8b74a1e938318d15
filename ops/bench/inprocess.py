"""The same search in one process: the engines called directly, no Redis, no Celery, no
messages on a wire (`fleet.py overhead`'s baseline). Each batch goes to its engine through
`cord.workers.engines.serve`, the dispatch a worker's task runs."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from harness import process_cpu_s

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
