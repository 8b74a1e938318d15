"""How many problems the pools' GPUs can take: admission sized by their KV caches, as the
servers report them, not by a count.

On a GPU server the sequences that decode together are those its KV cache holds. Too few
problems in flight and the batch runs thin: CoRD's problems spend part of each step
waiting on scoring and selection, and their sequences end at different times. Too many
and sequences queue for room, their prefixes are evicted and prefilled again, running
ones are preempted. A count (``max_in_flight``) cannot know where that lies: it moves
with the model, the card, the trace lengths and the step. Every worker's heartbeat
carries its runtime's KV capacity and how many sequences run and wait there
(`EngineStats`; vLLM's /metrics, the simulated card's own).

A problem needs, on each teacher's pool, its sequences of one phase (CoRD: a beam each,
``beam_width x samples_per_beam``; curation: its N trajectories, the same number by
default) at the context they hold while they run: the mean, over its requests, of the
prompt and half what the request wrote. That mean is learned from finished problems
(a young problem's contexts are short and would mislead), with half the thinking budget
before the first ends. Not all of them run at once: the pools' running sequences over
those the problems in flight could run at most give the duty, learned at each look at
the heartbeats (about once a second). `KVAdmission` admits while

    in flight x sequences x context x duty <= TARGET x capacity

on every teacher pool that reports its cache, and never more while a pool's cache is
full (`FULL`) with sequences waiting (a server also queues requests for other reasons,
e.g. its batch's token budget: those do not stop admission). A meta-prover of its own
holds each scoring context for one pass and does not steer. ``max_in_flight`` stays the
ceiling, and one problem is always admitted. TARGET is above 1 because on a GPU server
re-prefilling an evicted prefix rides along memory-bound decode passes, while a thin
batch wastes them: the simulated sweep in docs/benchmarks.md put the cost lowest at
about one and a half times what fits.
`make bench` measures what it buys (docs/benchmarks.md, "What a dataset costs on GPUs").
"""

from __future__ import annotations

from collections import defaultdict

from cord.common.config import RunConfig
from cord.common.messages import Generation
from cord.coordinator.routing import PoolKV

TARGET = 1.5  # of a pool's KV capacity the problems in flight should want (see above)
PROMPT_TOKENS = 256  # a question, before any is seen
LEARN = 0.2  # weight of a new observation in the running means
FULL = 0.9  # a cache this full, with sequences waiting, is out of room


class KVAdmission:
    def __init__(self, cfg: RunConfig) -> None:
        self.teachers = set(cfg.teacher_names)
        self.ceiling = cfg.max_in_flight
        self.seqs = cfg.search.beam_width * cfg.search.samples_per_beam
        self.context = PROMPT_TOKENS + cfg.search.thinking_budget / 2
        self.duty = 1.0
        self.limit: int | None = None  # None until a pool reports its cache
        self._seen: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # pid -> sum, n

    # -- what the results say -------------------------------------------------------
    def observe(self, pid: str, model: str, item: Generation) -> None:
        """A teacher's request of `pid` ended: the context it held while it ran."""
        if model in self.teachers and not item.error:
            seen = self._seen[pid]
            seen[0] += item.prompt_tokens + item.tokens / 2
            seen[1] += 1

    def finished(self, pid: str) -> None:
        """`pid` ended: its mean context teaches the next admissions."""
        total, n = self._seen.pop(pid, (0.0, 0.0))
        if n:
            self.context += LEARN * (total / n - self.context)

    # -- what the pools say -----------------------------------------------------------
    def update(self, pools: dict[str, PoolKV], in_flight: int) -> None:
        """A fresh look at the pools (`Router.kv`) with `in_flight` problems driven."""
        pools = {m: kv for m, kv in pools.items() if m in self.teachers and kv.capacity}
        if not pools:
            return
        if in_flight:
            duties = [kv.running / (in_flight * self.seqs) for kv in pools.values()]
            self.duty += LEARN * (min(1.0, max(0.05, sum(duties) / len(duties))) - self.duty)
        footprint = self.seqs * self.context * self.duty
        fits = min(TARGET * kv.capacity / footprint for kv in pools.values())
        limit = max(1, min(self.ceiling, int(fits)))
        if any(kv.waiting and kv.used >= FULL * kv.capacity for kv in pools.values()):
            limit = min(limit, max(1, in_flight))  # sequences queue for room: no more
        self.limit = limit

    def room(self) -> int:
        """Problems in flight the caches want now (the ceiling until one reports)."""
        return self.ceiling if self.limit is None else self.limit
