"""What every search strategy shares: the work it asks for, the trajectory type, the
rows it ends in (`cord.coordinator.rows`). A strategy is a pure state machine over one
problem: it never talks to Redis or Celery. The driver feeds it results and dispatches
the work it returns, so the same strategy runs through the fleet or in one process."""

from __future__ import annotations

import hashlib
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from cord.common import prompts
from cord.common.config import RunConfig
from cord.common.messages import AnswerItem, ExpandItem, Generation, Score, ScoreItem, TaskKind
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.matching import judge
from cord.coordinator.rows import (
    Alternative,
    FailureRow,
    Message,
    Models,
    RowStats,
    Stats,
    Step,
    ThinkingFinish,
    TraceRow,
)

R = TypeVar("R", TraceRow, FailureRow)


@dataclass(frozen=True)
class WorkKey:
    """The stable name of one item of work, ``<problem>:<kind>:<part>:...`` on the wire
    (an item's `key`). A strategy names its kinds (CoRD: ``x`` a step's expansion, ``s``
    its score, ``a`` an answer) and gets its own keys back, typed, with every result:
    nothing takes a key string apart."""

    problem: str
    kind: str
    parts: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        return ":".join([self.problem, self.kind, *map(str, self.parts)])

    def as_kind(self, kind: str) -> WorkKey:
        """The same parts under another kind (the score of an expansion, say)."""
        return WorkKey(self.problem, kind, self.parts)


@dataclass(frozen=True)
class Work:
    kind: TaskKind
    model: str
    key: WorkKey
    item: ExpandItem | AnswerItem | ScoreItem


@dataclass
class Outcome:
    """What one event changed in a search: the work it asks for now, whether its
    committed state changed (the driver persists a snapshot then), how many search steps
    that commit completed, once the search has finished its output row, and the work it
    no longer waits for (sent or not: the driver owes it nothing more, and ignores its
    results as late)."""

    work: list[Work] = field(default_factory=list)
    commit: bool = False
    steps: int = 0
    row: TraceRow | None = None
    dropped: list[str] = field(default_factory=list)  # items' keys, as sent


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: list[Step] = []
    tokens: int = 0
    score: float = 0.0
    complete: bool = False
    finish: ThinkingFinish | None = None  # how thinking ended
    final_answer: str | None = None
    answer_teacher: str | None = None
    answer_tokens: int = 0

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.steps]

    @property
    def last_teacher(self) -> str | None:
        return self.steps[-1].teacher if self.steps else None


def item_seed(run_seed: int, key: str) -> int:
    """A stable per-item seed: a re-dispatched item samples the same text."""
    digest = hashlib.blake2b(f"{run_seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class Search(ABC):
    """One problem's search. Subclasses keep their committed state in `self.state`, a
    pydantic model with `stats`, so that `snapshot()` is JSON and a restarted
    coordinator resumes from it; they implement `begin`, `generated` and `scored`, each
    returning an `Outcome`. The driver calls `start`, `on_generation` and `on_score`,
    which add the row once the search has finished."""

    name: str
    state: Any

    def __init__(self, problem: Problem, cfg: RunConfig) -> None:
        self.problem = problem
        self.cfg = cfg
        self.user = cfg.prompt.render(problem.question)
        self._t0 = time.monotonic()

    # -- what the driver calls --------------------------------------------------------
    def start(self) -> Outcome:
        """The first work (or, after a restart, the work of the committed state)."""
        return self._ended(self.begin())

    def on_generation(self, key: WorkKey, result: Generation) -> Outcome:
        return self._ended(self.generated(key, result))

    def on_score(self, key: WorkKey, result: Score) -> Outcome:
        return self._ended(self.scored(key, result))

    def _ended(self, outcome: Outcome) -> Outcome:
        if self.finished and outcome.row is None:
            outcome.row = self.row()
        return outcome

    # -- what a strategy implements ---------------------------------------------------
    @abstractmethod
    def begin(self) -> Outcome: ...

    @abstractmethod
    def generated(self, key: WorkKey, result: Generation) -> Outcome:
        """A generation for one of this search's keys (never an errored item: the driver
        retries or fails those)."""

    @abstractmethod
    def scored(self, key: WorkKey, result: Score) -> Outcome: ...

    @property
    @abstractmethod
    def finished(self) -> bool: ...

    @abstractmethod
    def row(self) -> TraceRow:
        """The output row of a finished search."""

    def snapshot(self) -> dict[str, Any]:
        """The committed state as JSON, wall time so far included."""
        st: dict[str, Any] = self.state.model_dump()  # a fresh copy, no deep copy first
        st["stats"] = self.stats_now().model_dump()
        return st

    def restore(self, state: dict[str, Any]) -> None:
        self.state = type(self.state).model_validate(state)

    def stats_now(self) -> Stats:
        stats: Stats = self.state.stats.model_copy()
        stats.wall_s = round(stats.wall_s + self.elapsed(), 3)
        return stats

    def key(self, kind: str, *parts: str | int) -> WorkKey:
        return WorkKey(self.problem.id, kind, parts)

    # -- helpers shared by strategies -------------------------------------------------
    def expand_work(
        self, teacher: str, key: WorkKey, steps: list[str], max_new: int, whole: bool = False
    ) -> Work:
        return Work(
            "expand",
            teacher,
            key,
            ExpandItem(
                key=str(key),
                prompt=self.user,
                steps=steps,
                next_step=len(steps) + 1,
                max_new_tokens=max_new,
                temperature=self.cfg.temperature(teacher),
                top_p=self.cfg.teacher(teacher).top_p,
                seed=item_seed(self.cfg.search.seed, str(key)),
                whole=whole,
            ),
        )

    def answer_work(self, teacher: str, key: WorkKey, steps: list[str]) -> Work:
        return Work(
            "answer",
            teacher,
            key,
            AnswerItem(
                key=str(key),
                prompt=self.user,
                steps=steps,
                max_new_tokens=self.cfg.search.answer_budget,
                temperature=self.cfg.temperature(teacher),
                top_p=self.cfg.teacher(teacher).top_p,
                seed=item_seed(self.cfg.search.seed, str(key)),
            ),
        )

    def score_work(self, key: WorkKey, steps: list[str]) -> Work:
        return Work(
            "score",
            self.cfg.meta_prover.name,
            key,
            ScoreItem(key=str(key), prompt=self.user, steps=steps, answer=self.problem.answer),
        )

    def take_answer(self, traj: Trajectory, result: Generation) -> Outcome:
        """`result` is the final answer of `traj`, written by the teacher of its last
        step; a second one for the same trajectory is a duplicate."""
        if traj.final_answer is not None:
            return Outcome()
        traj.final_answer = result.text.strip()
        traj.answer_teacher = traj.last_teacher
        traj.answer_tokens = result.tokens
        self.state.stats.answers += 1
        self.state.stats.add_generation(traj.last_teacher or "?", result)
        return Outcome(commit=True)

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    # -- rows: traces and failures, from one place ----------------------------------
    def _row(self, model: type[R], **fields: Any) -> R:
        """A row: the problem's own input fields, and over them (a row field wins over an
        input field of the same name: a dataset may well have a `score` or `messages`
        column) the fields every row has and `fields`."""
        p = self.problem
        head = {"id": p.id, "question": p.question, "reference_answer": p.answer}
        return model.model_validate(
            {**p.meta, **head, "strategy": self.cfg.search.strategy, **fields}
        )

    def failure_row(self, reason: str) -> FailureRow:
        """The row of a problem that could not be finished, with its committed state."""
        return self._row(
            FailureRow,
            reason=reason,
            state=self.snapshot(),
            failed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

    def _correctness(self, final: str) -> dict[str, Any]:
        """`correct` and how it was decided (`cord.coordinator.matching`), where the
        reference is known."""
        if not self.problem.answer.strip():
            return {}
        verdict = judge(final, self.problem.answer, self.cfg.eval.match)
        return {"correct": verdict.correct, "correct_by": verdict.by}

    def trace_row(self, best: Trajectory, others: list[Trajectory], stats: Stats) -> TraceRow:
        cfg = self.cfg
        final = best.final_answer or ""
        alternatives = [
            Alternative(
                steps=t.steps,
                final_answer=t.final_answer,
                answer_teacher=t.answer_teacher,
                score=t.score,
                thinking_finish=t.finish,
            )
            for t in others
        ]
        return self._row(
            TraceRow,
            steps=best.steps,
            final_answer=final,
            **self._correctness(final),
            answer_teacher=best.answer_teacher,
            score=best.score,
            thinking_finish=best.finish,
            messages=[
                Message(role="user", content=self.user),
                Message(role="assistant", content=prompts.assistant_message(best.texts, final)),
            ],
            stats=RowStats(
                **stats.model_dump(),
                steps=len(best.steps),
                thinking_tokens=best.tokens,
                answer_tokens=best.answer_tokens,
            ),
            models=Models(
                teachers={t.name: t.model for t in cfg.teachers},
                meta_prover={cfg.meta_prover.name: cfg.pool(cfg.meta_prover.name).model},
            ),
            alternatives=alternatives if cfg.output.keep_alternatives else [],
        )


_HEADER = re.compile(r"\n(?=" + re.escape(prompts.STEP_PREFIX) + r" \d+\.)")


def split_steps(text: str, teacher: str, tokens: int, first: int = 1) -> list[Step]:
    """Steps of a trajectory written in one go from step `first` on (the headers the
    teacher wrote split it), tokens shared out by length (exact in total)."""
    parts = [p.rstrip() for p in _HEADER.split(prompts.step_header(first) + text) if p.strip()]
    sizes = [len(p) for p in parts]
    counts = [tokens * s // sum(sizes) for s in sizes]
    counts[-1] += tokens - sum(counts)
    return [
        Step(index=i, text=p, teacher=teacher, score=None, tokens=n)
        for i, (p, n) in enumerate(zip(parts, counts, strict=True), start=first)
    ]
