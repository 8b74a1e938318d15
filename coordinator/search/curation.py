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

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from cord.common import prompts
from cord.common.messages import Generation, Score
from cord.coordinator.search.base import Failed, Search, Stats, Step, Trajectory, Work

_HEADER = re.compile(r"\n(?=" + re.escape(prompts.STEP_PREFIX) + r" \d+\.)")


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


def split_steps(text: str, teacher: str, tokens: int) -> list[Step]:
    """Steps of a whole trajectory, tokens shared out by length (exact in total)."""
    parts = [p.rstrip() for p in _HEADER.split(prompts.step_header(1) + text) if p.strip()]
    sizes = [len(p) for p in parts]
    counts = [tokens * s // sum(sizes) for s in sizes]
    counts[-1] += tokens - sum(counts)
    return [
        Step(index=i, text=p, teacher=teacher, score=None, tokens=n)
        for i, (p, n) in enumerate(zip(parts, counts, strict=True), start=1)
    ]


class CurationSearch(Search):
    name = "curation"

    def __init__(self, problem: Any, cfg: Any) -> None:
        super().__init__(problem, cfg)
        self.state = CurationState()
        strategy = cfg.search.strategy
        if strategy.startswith("single:"):
            self.teachers, self.samples = [strategy.split(":", 1)[1]], 1
        else:
            self.teachers = cfg.teacher_names
            self.samples = cfg.search.curation_samples or (
                cfg.search.beam_width * cfg.search.samples_per_beam
            )

    def _key(self, kind: str, *parts: object) -> str:
        return ":".join([self.problem.id, kind, *map(str, parts)])

    def start(self) -> list[Work]:
        st = self.state
        if not st.written:
            for teacher in self.teachers:
                for i in range(self.samples):
                    st.written[self._key("w", teacher, i)] = Written(teacher=teacher)
        work: list[Work] = []
        for key, w in st.written.items():
            if w.trajectory is None:
                work.append(
                    self.expand_work(
                        w.teacher, key, [], self.cfg.search.thinking_budget, whole=True
                    )
                )
            elif not w.scored:
                work.append(self.score_work(self._score_key(key), w.trajectory.texts))
        if st.chosen is not None and self._best().final_answer is None:
            work.append(self._answer())
        return work

    def _score_key(self, key: str) -> str:
        return key.replace(":w:", ":ws:", 1)

    def on_generation(self, key: str, result: Generation) -> list[Work]:
        if result.error:
            raise Failed(result.error)
        st = self.state
        if key == self._key("a"):
            best = self._best()
            if best.final_answer is None:
                best.final_answer = result.text.strip()
                best.answer_teacher = best.last_teacher
                best.answer_tokens = result.tokens
                st.stats.answers += 1
                st.stats.add_generation(best.last_teacher or "?", result)
                self.committed = True
            return []
        written = st.written.get(key)
        if written is None or written.trajectory is not None:
            return []
        steps = split_steps(result.text, written.teacher, max(1, result.tokens))
        finish = result.finish if result.finish in ("think_end", "eos") else "budget"
        written.trajectory = Trajectory(
            steps=steps, tokens=result.tokens, complete=True, finish=finish
        )
        st.stats.expansions += 1
        st.stats.add_generation(written.teacher, result)
        self.committed = True
        return [self.score_work(self._score_key(key), written.trajectory.texts)]

    def on_score(self, key: str, result: Score) -> list[Work]:
        if result.error:
            raise Failed(result.error)
        st = self.state
        written = st.written.get(key.replace(":ws:", ":w:", 1))
        if written is None or written.scored or written.trajectory is None:
            return []
        written.trajectory.score, written.scored = result.score, True
        st.stats.add_score(result)
        self.committed = True
        if not all(w.scored for w in st.written.values()):
            return []
        st.chosen = max(
            st.written,
            key=lambda k: (
                (st.written[k].trajectory.score, k)  # type: ignore[union-attr]
                if st.written[k].trajectory
                else (-1.0, k)
            ),
        )
        return [self._answer()]

    def _best(self) -> Trajectory:
        assert self.state.chosen is not None
        best = self.state.written[self.state.chosen].trajectory
        assert best is not None
        return best

    def _answer(self) -> Work:
        best = self._best()
        assert best.last_teacher is not None
        return self.answer_work(best.last_teacher, self._key("a"), best.texts)

    @property
    def finished(self) -> bool:
        return self.state.chosen is not None and self._best().final_answer is not None

    def row(self) -> dict[str, Any]:
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
