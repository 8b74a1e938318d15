"""The rows a run writes, typed: one `TraceRow` per solved problem (``traces.jsonl``), one
`FailureRow` per problem that could not be finished (``failed.jsonl``), and `summarize`,
the one place their figures are computed (`cord-coord eval`, `report`, the demo's summary
and the benchmarks all read it).

Strategies build these models, `output.JsonlWriter` writes them, `rundir` parses them back
(rows of older runs get their defaults and verdicts there). A problem's own input fields
(its `meta`) ride at the top level of its row beside the fields below; a field of the row
wins over an input field of the same name.

Every trace row has had the fields without defaults since the first version; `correct`
and `correct_by` came later (`rundir.add_verdict` judges rows written without them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cord.common.messages import Generation, Score

ThinkingFinish = Literal["think_end", "eos", "budget"]


class Step(BaseModel):
    """One step of a trajectory: its text (header included), who wrote it, its S when it
    was chosen (None where only whole trajectories are scored: curation) and its tokens."""

    model_config = ConfigDict(extra="forbid")
    index: int
    text: str
    teacher: str
    score: float | None
    tokens: int


class Stats(BaseModel):
    """What a search counts while it runs (its committed state keeps them)."""

    model_config = ConfigDict(extra="forbid")
    tokens_by_teacher: dict[str, int] = {}  # generated: kept and discarded steps, answers
    expansions: int = 0
    scorings: int = 0
    answers: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens a prefix cache served
    wall_s: float = 0.0

    def add_generation(self, teacher: str, g: Generation) -> None:
        self.tokens_by_teacher[teacher] = self.tokens_by_teacher.get(teacher, 0) + g.tokens
        self.prompt_tokens += g.prompt_tokens
        self.cached_prompt_tokens += g.cached_tokens

    def add_score(self, s: Score) -> None:
        self.scorings += 1
        self.prompt_tokens += s.prompt_tokens
        self.cached_prompt_tokens += s.cached_tokens

    @property
    def generated_tokens(self) -> int:
        """Every token any teacher generated for the problem."""
        return sum(self.tokens_by_teacher.values())


class RowStats(Stats):
    """A trace row's `stats`: the search's counts and the chosen trajectory's size."""

    steps: int = 0
    thinking_tokens: int = 0
    answer_tokens: int = 0


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class Models(BaseModel):
    """The model paths behind the row: every teacher's, and the meta-prover's."""

    model_config = ConfigDict(extra="forbid")
    teachers: dict[str, str | None] = {}
    meta_prover: dict[str, str | None] = {}


class Alternative(BaseModel):
    """Another complete trajectory of the search (its final answer only with
    ``search.answers: all``)."""

    model_config = ConfigDict(extra="forbid")
    steps: list[Step]
    final_answer: str | None = None
    answer_teacher: str | None = None
    score: float
    thinking_finish: ThinkingFinish | None = None


class RowId(BaseModel):
    """Any row's id, the rest of it unread (`output.RowIndex`)."""

    model_config = ConfigDict(extra="ignore")
    id: str


class _Row(BaseModel):
    # A problem's own input fields are carried through at the top level.
    model_config = ConfigDict(extra="allow")
    id: str
    question: str
    reference_answer: str
    strategy: str = ""

    @property
    def meta(self) -> dict[str, Any]:
        """The problem's own input fields, as the row carries them."""
        return dict(self.__pydantic_extra__ or {})


class TraceRow(_Row):
    """A row of ``traces.jsonl``."""

    steps: list[Step]
    final_answer: str
    correct: bool | None = None  # None: written before rows carried it (rundir judges)
    correct_by: str | None = None  # math-verify, exact or exact-fallback (matching.judge)
    answer_teacher: str | None = None
    score: float
    thinking_finish: ThinkingFinish | None = None
    messages: list[Message]
    stats: RowStats = RowStats()
    models: Models = Models()
    alternatives: list[Alternative] = []

    @property
    def right(self) -> bool:
        return self.correct is True

    @property
    def generated_tokens(self) -> int:
        return self.stats.generated_tokens

    @property
    def teachers(self) -> list[str]:
        """Who wrote each chosen step, in order."""
        return [s.teacher for s in self.steps]


class FailureRow(_Row):
    """A row of ``failed.jsonl``: why, and the search's last committed state."""

    reason: str
    state: dict[str, Any] = {}
    failed_at: str = ""


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(S of a right trace > S of a wrong one), ties half: the Mann-Whitney AUROC."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Summary(BaseModel):
    """A set of rows' figures. Accuracy is over problems: a failed problem counts as
    wrong. Means are per trace (per problem that has one)."""

    problems: int
    traces: int
    failed: int
    correct: int
    accuracy: float | None
    mean_score: float | None
    auroc: float | None  # how well S separates right from wrong traces
    mean_generated_tokens: float | None  # every teacher's, kept and discarded steps, answers
    mean_thinking_tokens: float | None  # of the chosen trajectory
    mean_steps: float | None
    mean_wall_s: float | None  # from a problem's first work to its row
    prompt_tokens: int
    cached_prompt_tokens: int
    steps_by_teacher: dict[str, int] = Field(default_factory=dict)  # the chosen steps'

    @property
    def cache_hit_share(self) -> float | None:
        """The share of prompt tokens a prefix cache served."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else None


def summarize(traces: Sequence[TraceRow], failed: Sequence[FailureRow] | int = 0) -> Summary:
    """The figures of `traces` and `failed` (rows, or how many failed). Every trace must
    carry its verdict (`rundir` gives rows of older runs theirs)."""
    fails = failed if isinstance(failed, int) else len(failed)
    problems = len(traces) + fails
    right = [r.score for r in traces if r.right]
    wrong = [r.score for r in traces if not r.right]
    teachers = Counter(t for r in traces for t in r.teachers)
    return Summary(
        problems=problems,
        traces=len(traces),
        failed=fails,
        correct=len(right),
        accuracy=len(right) / problems if problems else None,
        mean_score=_mean([r.score for r in traces]),
        auroc=auroc(right, wrong),
        mean_generated_tokens=_mean([r.generated_tokens for r in traces]),
        mean_thinking_tokens=_mean([r.stats.thinking_tokens for r in traces]),
        mean_steps=_mean([len(r.steps) for r in traces]),
        mean_wall_s=_mean([r.stats.wall_s for r in traces]),
        prompt_tokens=sum(r.stats.prompt_tokens for r in traces),
        cached_prompt_tokens=sum(r.stats.cached_prompt_tokens for r in traces),
        steps_by_teacher=dict(teachers),
    )
