"""The post-hoc baselines: every teacher writes whole trajectories on its own.

- ``curation``: each teacher writes N complete trajectories independently (N =
  ``search.curation_samples``, by default ``beam_width x samples_per_beam`` so that the
  generated tokens match CoRD's); the meta-prover scores each complete trajectory once;
  the best by S is kept and its teacher writes the final answer (S1, LIMO style).
- ``single:<teacher>``: one trajectory by one teacher, scored for the record.

A trajectory is written in one expansion (``whole``: it stops only at ``</think>``,
its end of turn or the thinking budget) and split into steps at the ``### Step``
headers the teacher wrote.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from cord.common.config import RunConfig
from cord.common.messages import Generation, Score
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import Stats, TraceRow
from cord.coordinator.search.base import (
    Outcome,
    Search,
    Trajectory,
    Work,
    WorkKey,
    split_steps,
)


class Written(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str
    trajectory: Trajectory | None = None
    scored: bool = False


class CurationState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    written: dict[str, Written] = {}  # by expand key
    chosen: str | None = None
    stats: Stats = Stats()


class CurationSearch(Search):
    """N whole trajectories by each of `teachers` (every teacher of the run by default),
    the best by S kept."""

    name = "curation"

    def __init__(
        self,
        problem: Problem,
        cfg: RunConfig,
        teachers: list[str] | None = None,
        samples: int | None = None,
    ) -> None:
        super().__init__(problem, cfg)
        self.state = CurationState()
        self.teachers = teachers or cfg.teacher_names
        self.samples = (
            samples
            or cfg.search.curation_samples
            or (cfg.search.beam_width * cfg.search.samples_per_beam)
        )

    def _keys(self) -> list[WorkKey]:
        """The whole-trajectory keys, one per teacher and sample (``w``; ``ws`` scores)."""
        return [self.key("w", t, i) for t in self.teachers for i in range(self.samples)]

    def begin(self) -> Outcome:
        st = self.state
        if not st.written:
            st.written = {str(k): Written(teacher=str(k.parts[0])) for k in self._keys()}
        work: list[Work] = []
        for key in self._keys():
            w = st.written[str(key)]
            if w.trajectory is None:
                budget = self.cfg.search.thinking_budget
                work.append(self.expand_work(w.teacher, key, [], budget, whole=True))
            elif not w.scored:
                work.append(self.score_work(key.as_kind("ws"), w.trajectory.texts))
        if st.chosen is not None and self._best().final_answer is None:
            work.append(self._answer())
        return Outcome(work)

    def generated(self, key: WorkKey, result: Generation) -> Outcome:
        st = self.state
        if key.kind == "a":
            return self.take_answer(self._best(), result)
        written = st.written.get(str(key))
        if written is None or written.trajectory is not None:
            return Outcome()
        steps = split_steps(result.text, written.teacher, max(1, result.tokens))
        finish = result.finish if result.finish in ("think_end", "eos") else "budget"
        written.trajectory = Trajectory(
            steps=steps, tokens=result.tokens, complete=True, finish=finish
        )
        st.stats.expansions += 1
        st.stats.add_generation(written.teacher, result)
        work = [self.score_work(key.as_kind("ws"), written.trajectory.texts)]
        return Outcome(work, commit=True, steps=1)

    def scored(self, key: WorkKey, result: Score) -> Outcome:
        st = self.state
        written = st.written.get(str(key.as_kind("w")))
        if written is None or written.scored or written.trajectory is None:
            return Outcome()
        written.trajectory.score, written.scored = result.score, True
        st.stats.add_score(result)
        if not all(w.scored for w in st.written.values()):
            return Outcome(commit=True)
        st.chosen = max(
            st.written,
            key=lambda k: (
                (st.written[k].trajectory.score, k)  # type: ignore[union-attr]
                if st.written[k].trajectory
                else (-1.0, k)
            ),
        )
        return Outcome([self._answer()], commit=True)

    def _best(self) -> Trajectory:
        assert self.state.chosen is not None
        best = self.state.written[self.state.chosen].trajectory
        assert best is not None
        return best

    def _answer(self) -> Work:
        best = self._best()
        assert best.last_teacher is not None
        return self.answer_work(best.last_teacher, self.key("a"), best.texts)

    @property
    def finished(self) -> bool:
        return self.state.chosen is not None and self._best().final_answer is not None

    def row(self) -> TraceRow:
        best = self._best()
        others = sorted(
            (
                w.trajectory
                for k, w in self.state.written.items()
                if k != self.state.chosen and w.trajectory is not None
            ),
            key=lambda t: -t.score,
        )
        stats = self.stats_now()
        return self.trace_row(best, others, stats)
