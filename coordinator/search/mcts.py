"""``mcts``: Monte-Carlo tree search over reasoning steps, the paper's search baseline
(docs/method.md, "Baselines": in the paper MCTS 89.6 against CoRD's beam 93.1).

The tree's nodes are partial trajectories, the root the empty one. Each iteration
selects a leaf by UCB from the root (mean S of a subtree plus
``mcts_c * sqrt(ln N(parent) / N(child))``, unvisited children first; c = 0.1 by
default, since S of sibling steps differs by tenths), expands it by one
step from every teacher (the same expansion CoRD makes per beam, so the fleet runs the
teachers side by side), scores each child with the meta-prover (S, exactly as CoRD
does) and backs each child's S up its path. A child whose step ends thinking (or
spends the thinking budget) is a complete trajectory and a leaf for good.

The budget is generated tokens (``search.mcts_tokens``; `cord-coord eval` matches it
to CoRD's tokens on the same problems, as it does curation's N). When it is spent, or
no leaf can grow, the search stops expanding: the best complete trajectory by S gets
its final answer from the teacher of its last step. Where none completed, the best
leaf by S is finished in one go by its last teacher (a whole expansion to ``</think>``)
and scored first.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from cord.common import prompts
from cord.common.config import RunConfig
from cord.common.messages import Generation, Score
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import Stats, Step, TraceRow
from cord.coordinator.search.base import Outcome, Search, Trajectory, Work, WorkKey, split_steps


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parent: int | None = None
    trajectory: Trajectory = Trajectory()
    children: list[int] = []
    visits: int = 0
    value: float = 0.0  # sum of the S backed up through this node
    expanded: bool = False

    @property
    def mean(self) -> float:
        return self.value / self.visits if self.visits else 0.0


class Child(BaseModel):
    """A candidate of the expansion under way, until it is scored."""

    model_config = ConfigDict(extra="forbid")
    teacher: str
    step: Step | None = None
    finish: str | None = None


class MctsState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: list[Node] = [Node()]
    iterations: int = 0
    generated: int = 0  # tokens the expansions generated so far (the budget's count)
    expanding: int | None = None  # the node whose children are being written
    finishing: int | None = None  # the leaf written to its end when none completed
    chosen: int | None = None  # the node whose trajectory is the trace
    stats: Stats = Stats()


class MctsSearch(Search):
    name = "mcts"

    def __init__(self, problem: Problem, cfg: RunConfig) -> None:
        super().__init__(problem, cfg)
        self.state = MctsState()
        search = cfg.search
        self.budget = search.mcts_tokens or (
            search.beam_width * search.samples_per_beam * len(cfg.teachers) * search.thinking_budget
        )
        self._children: dict[str, Child] = {}  # expand key -> candidate, this iteration

    # -- the tree ---------------------------------------------------------------------
    def _open(self, index: int) -> bool:
        """Can the subtree under `index` still grow?"""
        node = self.state.nodes[index]
        if node.trajectory.complete:
            return False
        if not node.expanded:
            return True
        return any(self._open(c) for c in node.children)

    def _leaf(self) -> int | None:
        """UCB descent from the root to a leaf not yet expanded; None when none is left."""
        nodes, c = self.state.nodes, self.cfg.search.mcts_c
        index = 0
        if not self._open(0):
            return None
        while nodes[index].expanded:
            parent = nodes[index]
            open_children = [i for i in parent.children if self._open(i)]

            def ucb(i: int, parent: Node = parent) -> tuple[float, int]:
                child = nodes[i]
                if child.visits == 0:
                    return (math.inf, -i)
                bonus = c * math.sqrt(math.log(max(1, parent.visits)) / child.visits)
                return (child.mean + bonus, -i)

            index = max(open_children, key=ucb)
        return index

    def _expansions(self, index: int) -> list[Work]:
        st, search = self.state, self.cfg.search
        st.expanding = index
        self._children.clear()
        traj = st.nodes[index].trajectory
        max_new = max(1, min(search.max_step_tokens, search.thinking_budget - traj.tokens))
        work = []
        for teacher in self.cfg.teacher_names:
            key = self.key("x", index, teacher)
            self._children[str(key)] = Child(teacher=teacher)
            work.append(self.expand_work(teacher, key, traj.texts, max_new))
        return work

    def _next(self) -> list[Work]:
        """After an iteration: expand the next leaf, or end the search."""
        st = self.state
        st.expanding = None
        leaf = self._leaf() if st.generated < self.budget else None
        if leaf is not None:
            return self._expansions(leaf)
        complete = [i for i, n in enumerate(st.nodes) if n.trajectory.complete]
        if complete:
            st.chosen = max(complete, key=lambda i: (st.nodes[i].trajectory.score, -i))
            return [self._answer()]
        leaves = [i for i, n in enumerate(st.nodes) if i and not n.expanded] or [0]
        st.finishing = max(leaves, key=lambda i: (st.nodes[i].trajectory.score, -i))
        return [self._finish_work()]

    def _finish_work(self) -> Work:
        st = self.state
        assert st.finishing is not None
        traj = st.nodes[st.finishing].trajectory
        teacher = traj.last_teacher or self.cfg.teacher_names[0]
        budget = max(1, self.cfg.search.thinking_budget - traj.tokens)
        key = self.key("f", st.finishing)
        return self.expand_work(teacher, key, traj.texts, budget, whole=True)

    def _answer(self) -> Work:
        st = self.state
        assert st.chosen is not None
        traj = st.nodes[st.chosen].trajectory
        assert traj.last_teacher is not None
        return self.answer_work(traj.last_teacher, self.key("a"), traj.texts)

    # -- lifecycle --------------------------------------------------------------------
    def begin(self) -> Outcome:
        st = self.state
        if st.chosen is not None:
            done = st.nodes[st.chosen].trajectory.final_answer is not None
            return Outcome([] if done else [self._answer()])
        if st.finishing is not None:
            traj = st.nodes[st.finishing].trajectory
            if traj.complete:  # written, not scored yet
                return Outcome([self.score_work(self.key("fs", st.finishing), traj.texts)])
            return Outcome([self._finish_work()])
        if st.expanding is not None:
            return Outcome(self._expansions(st.expanding))
        return Outcome(self._expansions(0))

    def generated(self, key: WorkKey, result: Generation) -> Outcome:
        st = self.state
        if key.kind == "a":
            if st.chosen is None:
                return Outcome()
            return self.take_answer(st.nodes[st.chosen].trajectory, result)
        if key.kind == "f":
            return self._finished_leaf(key, result)
        child = self._children.get(str(key))
        if child is None or child.step is not None or st.expanding is None:
            return Outcome()  # late or duplicate
        parent = st.nodes[st.expanding].trajectory
        index = len(parent.steps) + 1
        text = prompts.clean_step(prompts.step_header(index), result.text)
        child.step = Step(
            index=index, text=text, teacher=child.teacher, score=None, tokens=max(1, result.tokens)
        )
        child.finish = result.finish
        st.generated += result.tokens
        st.stats.expansions += 1
        st.stats.add_generation(child.teacher, result)
        steps = [*parent.texts, text]
        return Outcome([self.score_work(key.as_kind("s"), steps)])

    def _finished_leaf(self, key: WorkKey, result: Generation) -> Outcome:
        st = self.state
        if st.finishing is None or key.parts[0] != st.finishing:
            return Outcome()
        node = st.nodes[st.finishing]
        if node.trajectory.complete:
            return Outcome()
        teacher = node.trajectory.last_teacher or self.cfg.teacher_names[0]
        first = len(node.trajectory.steps) + 1
        rest = split_steps(result.text, teacher, max(1, result.tokens), first=first)
        traj = node.trajectory
        traj.steps = [*traj.steps, *rest]
        traj.tokens += result.tokens
        traj.complete = True
        traj.finish = result.finish if result.finish in ("think_end", "eos") else "budget"
        st.generated += result.tokens
        st.stats.expansions += 1
        st.stats.add_generation(teacher, result)
        score = self.score_work(self.key("fs", st.finishing), traj.texts)
        return Outcome([score], commit=True)

    def scored(self, key: WorkKey, result: Score) -> Outcome:
        st = self.state
        if key.kind == "fs":
            if st.finishing is None or key.parts[0] != st.finishing or st.chosen is not None:
                return Outcome()
            st.nodes[st.finishing].trajectory.score = result.score
            st.stats.add_score(result)
            st.chosen = st.finishing
            return Outcome([self._answer()], commit=True)
        child = self._children.get(str(key.as_kind("x")))
        if child is None or child.step is None or child.step.score is not None:
            return Outcome()
        child.step.score = result.score
        st.stats.add_score(result)
        if any(c.step is None or c.step.score is None for c in self._children.values()):
            return Outcome()
        return self._grow()

    def _grow(self) -> Outcome:
        """Every child of the expanding node is scored: add them, back their S up."""
        st, search = self.state, self.cfg.search
        assert st.expanding is not None
        parent_index = st.expanding
        parent = st.nodes[parent_index]
        parent.expanded = True
        for child in self._children.values():
            assert child.step is not None and child.step.score is not None
            steps = [*parent.trajectory.steps, child.step]
            traj = Trajectory(
                steps=steps,
                tokens=parent.trajectory.tokens + child.step.tokens,
                score=child.step.score,
            )
            if child.finish in ("think_end", "eos"):
                traj.complete, traj.finish = True, child.finish
            elif traj.tokens >= search.thinking_budget:
                traj.complete, traj.finish = True, "budget"
            st.nodes.append(Node(parent=parent_index, trajectory=traj))
            index = len(st.nodes) - 1
            parent.children.append(index)
            at: int | None = index
            while at is not None:  # back the child's S up to the root
                st.nodes[at].visits += 1
                st.nodes[at].value += child.step.score
                at = st.nodes[at].parent
        st.iterations += 1
        return Outcome(self._next(), commit=True, steps=1)

    @property
    def finished(self) -> bool:
        st = self.state
        return st.chosen is not None and st.nodes[st.chosen].trajectory.final_answer is not None

    def row(self) -> TraceRow:
        st = self.state
        assert st.chosen is not None
        best = st.nodes[st.chosen].trajectory
        others = sorted(
            (
                n.trajectory
                for i, n in enumerate(st.nodes)
                if n.trajectory.complete and i != st.chosen
            ),
            key=lambda t: -t.score,
        )
        return self.trace_row(best, others, self.stats_now())
