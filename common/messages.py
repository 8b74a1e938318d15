"""Every message that crosses the coordinator/worker boundary, and nothing else: tasks,
results, and the workers' heartbeat records.

Tasks travel through Celery (JSON only); results come back on a Redis Stream named by
the request's ``reply_to``. One task carries a batch of items; every item has a
``key`` that is unique for the work it names and stable across re-dispatch, so a late
or duplicate result is recognised and ignored by the coordinator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TaskKind = Literal["expand", "score", "answer"]
# step: stopped at the next "### Step" header; think_end: wrote </think>; length: ran
# into max_new_tokens; eos: the model ended its turn.
FinishReason = Literal["step", "think_end", "length", "eos"]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpandItem(_Msg):
    """Continue the trajectory `steps` by one step, whose header is `next_step`; with
    `whole`, write the rest of the trajectory (to ``</think>``) in one go."""

    key: str
    prompt: str  # the user turn, rendered from the run config's prompt template
    steps: list[str]
    next_step: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    top_p: float = 1.0
    seed: int
    whole: bool = False


class AnswerItem(_Msg):
    """Write the final answer after the closed thinking block of `steps`."""

    key: str
    prompt: str  # the user turn, rendered from the run config's prompt template
    steps: list[str]
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    top_p: float = 1.0
    seed: int


class ScoreItem(_Msg):
    """S of the reference `answer` after `steps` (docs/method.md, step 4)."""

    key: str
    prompt: str  # the user turn, rendered from the run config's prompt template
    steps: list[str]
    answer: str


class Generation(_Msg):
    key: str
    text: str = ""
    finish: FinishReason = "length"
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    retryable: bool = False


class Score(_Msg):
    key: str
    score: float = 0.0
    answer_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    retryable: bool = False


class TaskRequest(_Msg):
    task_id: str
    kind: TaskKind
    model: str
    reply_to: str
    attempt: int = 1
    # Reply per item as items finish (`TaskResult.partial`), not once for the task.
    stream: bool = False
    expand: list[ExpandItem] = []
    answer: list[AnswerItem] = []
    score: list[ScoreItem] = []

    def keys(self) -> list[str]:
        items: list[ExpandItem | AnswerItem | ScoreItem] = [*self.expand, *self.answer, *self.score]
        return [i.key for i in items]


class TaskResult(_Msg):
    task_id: str
    kind: TaskKind
    model: str
    worker: str
    elapsed_s: float = 0.0
    generations: list[Generation] = []
    scores: list[Score] = []
    # A whole-task failure (bad message, engine not loaded); item errors live on items.
    error: str | None = None
    retryable: bool = False
    # The worker is shutting down (a spot notice) and gave the task back unfinished:
    # send it elsewhere now, without counting an attempt.
    handed_back: bool = False
    # Some of the task's items, sent as they finished (`TaskRequest.stream`); the task's
    # last reply (not partial) carries the rest, and only it closes the task.
    partial: bool = False


# -- the worker registry: what a worker's heartbeat writes, what status and routing read --
class _Record(BaseModel):
    # Read by coordinators and `cord-coord status` of other versions during a rolling
    # update: a field they do not know is skipped, not an error.
    model_config = ConfigDict(extra="ignore")


class TokenCounts(_Record):
    """Tokens by kind, the one set of counters of the engines, the workers' heartbeats
    and their metrics (`TOKEN_KINDS`): generated; scored (reference answers' tokens
    scored); prompt (read); cached (prompt tokens a prefix cache served)."""

    generated: int = 0
    scored: int = 0
    prompt: int = 0
    cached: int = 0

    def add(self, other: TokenCounts) -> None:
        for kind in TOKEN_KINDS:
            setattr(self, kind, getattr(self, kind) + getattr(other, kind))

    def minus(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(**{k: getattr(self, k) - getattr(other, k) for k in TOKEN_KINDS})

    @classmethod
    def of(cls, result: TaskResult) -> TokenCounts:
        """The tokens of a finished task's items."""
        gens, scores = result.generations, result.scores
        return cls(
            generated=sum(g.tokens for g in gens),
            scored=sum(s.answer_tokens for s in scores),
            prompt=sum(g.prompt_tokens for g in gens) + sum(s.prompt_tokens for s in scores),
            cached=sum(g.cached_tokens for g in gens) + sum(s.cached_tokens for s in scores),
        )


TOKEN_KINDS: tuple[str, ...] = tuple(TokenCounts.model_fields)


class SimStats(_Record):
    """The simulated GPU's clock and counters (`engine: sim`), in simulated seconds."""

    clock_s: float = 0.0  # simulated time since the engine started
    busy_s: float = 0.0  # with at least one sequence prefilling or decoding
    decode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0  # prompt tokens computed (not served by the cache)
    evicted_prefill_tokens: int = 0  # of those, tokens whose blocks had been evicted
    decode_seq_steps: int = 0  # sequence-steps decoded: sum of the batch over passes
    decode_passes: int = 0
    preemptions: int = 0  # sequences pushed out of a full cache, to be computed again
    lag_s: float = 0.0  # real seconds passes ended late (the host, not the card): not in clock_s

    def minus(self, other: SimStats) -> SimStats:
        return SimStats(**{k: getattr(self, k) - getattr(other, k) for k in SimStats.model_fields})


class EngineStats(_Record):
    """An engine's counters since it started, and its runtime's own figures."""

    requests: int = 0  # items served
    tokens: TokenCounts = TokenCounts()
    busy_s: float = 0.0  # seconds inside engine calls, summed over calls run at once
    busy_wall_s: float = 0.0  # seconds with at least one engine call running
    engine: str | None = None  # set by the `bench` engine, whose figures are not data
    cache_entries: int | None = None  # hf: its prefix KV cache
    cache_tokens: int | None = None
    server_url: str | None = None  # sglang, vllm: the server behind the worker
    server_restarts: int | None = None
    server_cache_hit_tokens: int | None = None  # vllm: the server's own prefix-cache counters
    server_cache_query_tokens: int | None = None
    # The runtime's KV cache and queue now (vLLM's /metrics, the simulated card's): what
    # admission sizes the problems in flight by (coordinator/admission.py).
    kv_capacity_tokens: int | None = None
    kv_used_tokens: int | None = None
    requests_running: int | None = None
    requests_waiting: int | None = None
    sim: SimStats | None = None  # engine `sim`: its simulated clock

    def since(self, before: EngineStats) -> EngineStats:
        """What the counters grew by since `before` (the benchmarks' figures of one run);
        what is not a number (a URL) stays as it is now."""
        grown = self.model_copy(update={"tokens": self.tokens.minus(before.tokens)})
        if self.sim is not None:
            grown.sim = self.sim.minus(before.sim or SimStats())
        for name, value in self:
            if name in GAUGES:  # a level now, not a counter
                continue
            old = getattr(before, name)
            if isinstance(value, int | float) and isinstance(old, int | float):
                setattr(grown, name, value - old)
        return grown


GAUGES = ("kv_capacity_tokens", "kv_used_tokens", "requests_running", "requests_waiting")


class Heartbeat(_Record):
    """A worker's record in the registry (`Keys.workers`), rewritten every
    ``reliability.heartbeat_s``; its liveness key beside it says whether it is alive."""

    model: str
    queues: list[str] = []
    host: str = ""
    ts: float = 0.0
    tasks_done: int = 0
    engine: EngineStats = EngineStats()
    tokens: TokenCounts = TokenCounts()  # totals since the worker started
    tokens_per_s_1m: float = 0.0  # generated, over the last minute
    scored_tokens_per_s_1m: float = 0.0
    metrics_port: int | None = None
