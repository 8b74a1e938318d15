"""CoRD: collaborative step-wise multi-teacher beam search (cord-method.md, steps 2-7).

Per step: every teacher continues every live beam by one step (``samples_per_beam``
samples each); every candidate is scored by the meta-prover as soon as it arrives
(predictive perplexity S of the reference answer; a trajectory that two teachers wrote
alike is scored once, about a third of the lab's candidates); when all are scored, the top
``beam_width - completed`` distinct trajectories by S across all teachers and beams are
kept. A trajectory is complete when its step ends in ``</think>`` (or the model's end of
turn) or the thinking budget is spent; the teacher that wrote its last step then writes
the final answer. The search ends when no beam is live and every complete one has its
answer; the best complete trajectory by S is the trace, the others are alternatives.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict

from cord.common import prompts
from cord.common.messages import Generation, Score
from cord.coordinator.search.base import (
    Failed,
    Search,
    Stats,
    Step,
    Trajectory,
    Work,
    item_seed,
)


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    beam: int
    teacher: str
    text: str | None = None
    finish: str | None = None
    tokens: int = 0
    score: float | None = None


class CordState(BaseModel):
    """The committed state: what survives a coordinator restart."""

    model_config = ConfigDict(extra="forbid")
    step: int = 1
    beams: list[Trajectory] = [Trajectory()]
    completed: list[Trajectory] = []
    stats: Stats = Stats()


class CordSearch(Search):
    name = "cord"

    def __init__(self, problem: Any, cfg: Any) -> None:
        super().__init__(problem, cfg)
        self.state = CordState()
        self._cands: dict[str, Candidate] = {}  # current step, by expand key
        self._by_score_key: dict[str, str] = {}  # score key -> expand key
        # A trajectory two teachers wrote alike this step is scored once: its text ->
        # the expand key whose score answers for it.
        self._scored_as: dict[tuple[str, ...], str] = {}
        self._answer_keys: dict[str, int] = {}  # answer key -> index into completed

    # -- keys -----------------------------------------------------------------------
    def _key(self, kind: str, *parts: object) -> str:
        return ":".join([self.problem.id, kind, *map(str, parts)])

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> list[Work]:
        work = self._expansions()
        for index, traj in enumerate(self.state.completed):
            if traj.final_answer is None:
                work.append(self._answer(index))
        return work

    def _expansions(self) -> list[Work]:
        st, search = self.state, self.cfg.search
        self._cands.clear()
        self._by_score_key.clear()
        self._scored_as.clear()
        work = []
        for b, beam in enumerate(st.beams):
            budget_left = search.thinking_budget - beam.tokens
            max_new = max(1, min(search.max_step_tokens, budget_left))
            for teacher in self.cfg.teacher_names:
                for sample in range(search.samples_per_beam):
                    key = self._key("x", st.step, b, teacher, sample)
                    self._cands[key] = Candidate(key=key, beam=b, teacher=teacher)
                    work.append(self.expand_work(teacher, key, beam.texts, max_new))
        return work

    def _answer(self, index: int) -> Work:
        traj = self.state.completed[index]
        key = self._key("a", index)
        self._answer_keys[key] = index
        assert traj.last_teacher is not None
        return self.answer_work(traj.last_teacher, key, traj.texts)

    def on_generation(self, key: str, result: Generation) -> list[Work]:
        if result.error:
            raise Failed(result.error)
        if key in self._answer_keys:
            traj = self.state.completed[self._answer_keys.pop(key)]
            traj.final_answer = result.text.strip()
            traj.answer_teacher = traj.last_teacher
            traj.answer_tokens = result.tokens
            self.state.stats.answers += 1
            self.state.stats.add_generation(traj.last_teacher or "?", result)
            self.committed = True
            return []
        cand = self._cands.get(key)
        if cand is None or cand.text is not None:
            return []  # late or duplicate
        cand.text = prompts.clean_step(prompts.step_header(self.state.step), result.text)
        cand.finish, cand.tokens = result.finish, max(1, result.tokens)
        self.state.stats.expansions += 1
        self.state.stats.add_generation(cand.teacher, result)
        text = self._text(cand)
        first = self._scored_as.setdefault(text, key)
        if first != key:  # the same trajectory as another candidate: share its score
            cand.score = self._cands[first].score  # None until it comes (`on_score`)
            return self._select_when_scored()
        score_key = self._key("s", *key.split(":")[-4:])
        self._by_score_key[score_key] = key
        return [self.score_work(score_key, list(text))]

    def on_score(self, key: str, result: Score) -> list[Work]:
        if result.error:
            raise Failed(result.error)
        cand = self._cands.get(self._by_score_key.get(key, ""))
        if cand is None or cand.score is not None:
            return []
        cand.score = result.score
        self.state.stats.add_score(result)
        for twin in self._cands.values():  # copies that arrived before this score
            if twin.score is None and self._scored_as.get(self._text(twin)) == cand.key:
                twin.score = result.score
        return self._select_when_scored()

    def _select_when_scored(self) -> list[Work]:
        if any(c.score is None for c in self._cands.values()):
            return []
        return self._select()

    beam_width_override: int | None = None

    def _ranked(self) -> list[Candidate]:
        """All candidates of the step, best first: by S (ties by key). Candidates that
        make the same trajectory (two teachers wrote the same step) were scored once and
        rank together, smallest key first: which copy arrived first must not decide the
        order of the beams, since the next step's keys and seeds follow it (a re-run
        would otherwise differ)."""
        best: dict[tuple[str, ...], tuple[float, str]] = {}
        for c in self._cands.values():
            text = self._text(c)
            score, key = best.get(text, (float("-inf"), c.key))
            best[text] = (max(score, c.score or 0.0), min(key, c.key))

        def rank(c: Candidate) -> tuple[float, str, str]:
            score, first = best[self._text(c)]
            return (-score, first, c.key)

        return sorted(self._cands.values(), key=rank)

    def _text(self, c: Candidate) -> tuple[str, ...]:
        return (*self.state.beams[c.beam].texts, c.text or "")

    def _select(self) -> list[Work]:
        st, search = self.state, self.cfg.search
        keep = (self.beam_width_override or search.beam_width) - len(st.completed)
        ranked = self._ranked()
        chosen: list[Candidate] = []
        seen: set[tuple[str, ...]] = set()
        for c in ranked:
            assert c.text is not None
            text = self._text(c)
            if text not in seen:
                seen.add(text)
                chosen.append(c)
            if len(chosen) == keep:
                break
        live: list[Trajectory] = []
        work: list[Work] = []
        for c in chosen:
            parent = st.beams[c.beam]
            step = Step(
                index=st.step,
                text=c.text or "",
                teacher=c.teacher,
                score=c.score or 0.0,
                tokens=c.tokens,
            )
            traj = Trajectory(
                steps=[*parent.steps, step], tokens=parent.tokens + c.tokens, score=step.score
            )
            if c.finish in ("think_end", "eos"):
                traj.complete, traj.finish = True, c.finish
            elif traj.tokens >= search.thinking_budget:
                traj.complete, traj.finish = True, "budget"
            if traj.complete:
                st.completed.append(traj)
                work.append(self._answer(len(st.completed) - 1))
            else:
                live.append(traj)
        st.beams = live
        st.step += 1
        self.committed = True
        if live:
            work.extend(self._expansions())
        else:
            self._cands.clear()
        return work

    @property
    def finished(self) -> bool:
        st = self.state
        return not st.beams and all(t.final_answer is not None for t in st.completed)

    def row(self) -> dict[str, Any]:
        st = self.state
        ranked = sorted(st.completed, key=lambda t: -t.score)
        stats = self.stats_now()
        return self.trace_row(ranked[0], ranked[1:], stats)


class GreedySearch(CordSearch):
    """CoRD with a beam of one (the paper's greedy ablation)."""

    beam_width_override = 1


class RandomSelectSearch(CordSearch):
    """CoRD with the selection ablated: candidates are kept in a random (seeded) order
    instead of by S. Every candidate is still scored, so S is reported."""

    def _ranked(self) -> list[Candidate]:
        order = sorted(self._cands.values(), key=lambda c: c.key)
        rng = random.Random(item_seed(self.cfg.search.seed, f"{self.problem.id}:{self.state.step}"))
        rng.shuffle(order)
        return order
