"""CoRD: collaborative step-wise multi-teacher beam search (docs/method.md, "The
method", steps 2-7).

Per step: every teacher continues every live beam by one step (``samples_per_beam``
samples each); every candidate is scored by the meta-prover as soon as it arrives
(predictive perplexity S of the reference answer; a trajectory that two teachers wrote
alike is scored once, about a third of the lab's candidates); when all are scored, the top
``beam_width - completed`` distinct trajectories by S across all teachers and beams are
kept (with ``search.straggler_cut: k``, once all but k candidates are scored: the k
slowest are left out of that step). A trajectory is complete when its step ends in
``</think>`` (or the model's end of turn) or the thinking budget is spent; the teacher
that wrote its last step writes the final answer. With ``search.answers: best`` (the
default) only the trace gets one: once no beam is live, the best complete trajectory by S
is answered (a complete beam that is not the trace needs no answer to be data, and
answering every one cost CoRD about four answers per problem where curation writes one);
with ``all`` each is answered as it completes.
The search ends when the trace (or every complete trajectory) has its answer; the best
complete trajectory by S is the trace, the others are alternatives.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from cord.common import prompts
from cord.common.config import RunConfig
from cord.common.messages import Generation, Score
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import Stats, Step, TraceRow
from cord.coordinator.search.base import (
    Outcome,
    Search,
    Trajectory,
    Work,
    WorkKey,
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


# A selection rule ranks one step's candidates, best first; the top `beam_width -
# completed` distinct trajectories survive. A new rule (an ablation) is one function.
Rule = Callable[["CordSearch", list[Candidate]], list[Candidate]]


def by_score(search: CordSearch, cands: list[Candidate]) -> list[Candidate]:
    """CoRD's rule: by S (ties by key). Candidates that make the same trajectory (two
    teachers wrote the same step) were scored once and rank together, smallest key
    first: which copy arrived first must not decide the order of the beams, since the
    next step's keys and seeds follow it (a re-run would otherwise differ)."""
    best: dict[tuple[str, ...], tuple[float, str]] = {}
    for c in cands:
        text = search.text(c)
        score, key = best.get(text, (float("-inf"), c.key))
        best[text] = (max(score, c.score or 0.0), min(key, c.key))

    def rank(c: Candidate) -> tuple[float, str, str]:
        score, first = best[search.text(c)]
        return (-score, first, c.key)

    return sorted(cands, key=rank)


def random_order(search: CordSearch, cands: list[Candidate]) -> list[Candidate]:
    """The selection ablated: a random (seeded) order. Every candidate is still scored,
    so S is reported."""
    order = sorted(cands, key=lambda c: c.key)
    seed = item_seed(search.cfg.search.seed, f"{search.problem.id}:{search.state.step}")
    random.Random(seed).shuffle(order)
    return order


def longest(search: CordSearch, cands: list[Candidate]) -> list[Candidate]:
    """The paper's length ablation: the longest steps (most tokens) first, ties by S,
    then by key."""
    return sorted(cands, key=lambda c: (-c.tokens, -(c.score or 0.0), c.key))


class CordSearch(Search):
    name = "cord"

    def __init__(
        self,
        problem: Problem,
        cfg: RunConfig,
        select: Rule = by_score,
        beam_width: int | None = None,
    ) -> None:
        super().__init__(problem, cfg)
        self.select = select
        self.beam_width = beam_width or cfg.search.beam_width
        self.state = CordState()
        self._cands: dict[str, Candidate] = {}  # current step, by expand key
        self._by_score_key: dict[WorkKey, str] = {}  # score key -> expand key
        # A trajectory two teachers wrote alike this step is scored once: its text ->
        # the expand key whose score answers for it.
        self._scored_as: dict[tuple[str, ...], str] = {}
        self._answer_keys: dict[WorkKey, int] = {}  # answer key -> index into completed

    # -- lifecycle ------------------------------------------------------------------
    def begin(self) -> Outcome:
        work = self._expansions() if self.state.beams else []
        return Outcome(work + self._answers())

    def _answers(self) -> list[Work]:
        """The final answers owed now: every complete trajectory without one (`all`), or
        the best one once no beam is live (`best`)."""
        st = self.state
        if self.cfg.search.answers == "all":
            todo = list(range(len(st.completed)))
        elif st.beams or not st.completed:
            todo = []
        else:
            todo = [self._best_index()]
        asked = set(self._answer_keys.values())
        return [
            self._answer(i) for i in todo if st.completed[i].final_answer is None and i not in asked
        ]

    def _best_index(self) -> int:
        """The trace: the complete trajectory of the best S (the first of equals)."""
        scores = [t.score for t in self.state.completed]
        return scores.index(max(scores))

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
                    key = self.key("x", st.step, b, teacher, sample)
                    self._cands[str(key)] = Candidate(key=str(key), beam=b, teacher=teacher)
                    work.append(self.expand_work(teacher, key, beam.texts, max_new))
        return work

    def _answer(self, index: int) -> Work:
        traj = self.state.completed[index]
        key = self.key("a", index)
        self._answer_keys[key] = index
        assert traj.last_teacher is not None
        return self.answer_work(traj.last_teacher, key, traj.texts)

    def generated(self, key: WorkKey, result: Generation) -> Outcome:
        if key in self._answer_keys:
            return self.take_answer(self.state.completed[self._answer_keys.pop(key)], result)
        cand = self._cands.get(str(key))
        if cand is None or cand.text is not None:
            return Outcome()  # late or duplicate
        cand.text = prompts.clean_step(prompts.step_header(self.state.step), result.text)
        cand.finish, cand.tokens = result.finish, max(1, result.tokens)
        self.state.stats.expansions += 1
        self.state.stats.add_generation(cand.teacher, result)
        text = self.text(cand)
        first = self._scored_as.setdefault(text, cand.key)
        if first != cand.key:  # the same trajectory as another candidate: share its score
            cand.score = self._cands[first].score  # None until it comes (`scored`)
            return self._select_when_scored()
        score_key = key.as_kind("s")
        self._by_score_key[score_key] = cand.key
        return Outcome([self.score_work(score_key, list(text))])

    def scored(self, key: WorkKey, result: Score) -> Outcome:
        cand = self._cands.get(self._by_score_key.get(key, ""))
        if cand is None or cand.score is not None:
            return Outcome()
        cand.score = result.score
        self.state.stats.add_score(result)
        for twin in self._cands.values():  # copies that arrived before this score
            if twin.score is None and self._scored_as.get(self.text(twin)) == cand.key:
                twin.score = result.score
        return self._select_when_scored()

    def _select_when_scored(self) -> Outcome:
        waiting = sum(c.score is None for c in self._cands.values())
        if waiting > self.cfg.search.straggler_cut or waiting == len(self._cands):
            return Outcome()
        return self._select()

    def text(self, c: Candidate) -> tuple[str, ...]:
        """The trajectory candidate `c` makes: its beam's steps and its own."""
        return (*self.state.beams[c.beam].texts, c.text or "")

    def _left_out(self) -> list[str]:
        """The work of the candidates a straggler cut leaves out: their expansions not in
        (a candidate's key is its expansion's) and their scores not in."""
        waiting = {c.key for c in self._cands.values() if c.score is None}
        expansions = [c.key for c in self._cands.values() if c.text is None]
        return expansions + [str(k) for k, cand in self._by_score_key.items() if cand in waiting]

    def _select(self) -> Outcome:
        st, search = self.state, self.cfg.search
        keep = self.beam_width - len(st.completed)
        dropped = self._left_out()
        scored = [c for c in self._cands.values() if c.score is not None]
        ranked = self.select(self, scored)
        chosen: list[Candidate] = []
        seen: set[tuple[str, ...]] = set()
        for c in ranked:
            assert c.text is not None
            text = self.text(c)
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
            else:
                live.append(traj)
        st.beams = live
        st.step += 1
        if live:
            work.extend(self._expansions())
        else:
            self._cands.clear()
        work.extend(self._answers())
        return Outcome(work, commit=True, steps=1, dropped=dropped)

    @property
    def finished(self) -> bool:
        st = self.state
        if st.beams or not st.completed:
            return False
        if self.cfg.search.answers == "all":
            return all(t.final_answer is not None for t in st.completed)
        return st.completed[self._best_index()].final_answer is not None

    def row(self) -> TraceRow:
        st = self.state
        best = self._best_index()
        others = sorted(
            (t for i, t in enumerate(st.completed) if i != best), key=lambda t: -t.score
        )
        return self.trace_row(st.completed[best], others, self.stats_now())
