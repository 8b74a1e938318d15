"""Arithmetic problems with many short steps: "What is 3 + 4 + 2 + 9 + 5?".

Each step rewrites the previous line with the first addition done, which needs only
local work and copying (tiny models can learn it on a CPU):

    ### Step 1. 7 + 2 + 9 + 5
    ### Step 2. 9 + 9 + 5
    ### Step 3. 18 + 5
    ### Step 4. 23

`make_problems(n, seed)` is deterministic; training and evaluation use disjoint seeds,
and the held-out sets (evaluation, demo) are removed from the training stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from cord.common.prompts import step_header

MIN_TERMS, MAX_TERMS = 4, 12
# The lab's user turn: the question alone (the run config's prompt.template).
LAB_TEMPLATE = "{question}"
# Held-out sets: the evaluation problems and the demo's.
EVAL_SEED, EVAL_N = 7, 1000
DEMO_SEED, DEMO_N = 900001, 100


Shape = Literal["cord", "gsm8k", "math"]
SHAPES: tuple[Shape, ...] = ("cord", "gsm8k", "math")


@dataclass(frozen=True)
class ArithProblem:
    id: str
    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "What is " + " + ".join(map(str, self.terms)) + "?"

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "question": self.question, "answer": self.answer}

    def shaped(self, like: Shape) -> dict[str, str]:
        """The problem as a dataset of that kind writes it (`cord-coord lab-problems
        --like`), to try the field mapping on problems the lab's models can solve:
        `gsm8k`, a `question` and an `answer` that works it out and ends in ``#### N``
        (no id); `math`, a `problem`, a `solution` with the answer in ``\\boxed{N}``, a
        `level`, a `type` and a `unique_id`."""
        if like == "gsm8k":
            work = "\n".join(solution_lines(self.terms))
            return {"question": self.question, "answer": f"{work}\n#### {self.answer}"}
        if like == "math":
            return {
                "problem": self.question,
                "solution": f"Adding the terms in order gives $\\boxed{{{self.answer}}}$.",
                "level": "Level 1",
                "type": "Arithmetic",
                "unique_id": f"lab/{self.id}.json",
            }
        return self.to_json()


def random_terms(
    rng: random.Random, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS
) -> tuple[int, ...]:
    return tuple(rng.randint(1, 9) for _ in range(rng.randint(min_terms, max_terms)))


def make_problems(
    n: int, seed: int, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS
) -> list[ArithProblem]:
    return list(iter_problems(n, seed, min_terms, max_terms))


def iter_problems(
    n: int, seed: int, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS
) -> Iterator[ArithProblem]:
    """`make_problems`, one at a time (a million of them need no list)."""
    rng = random.Random(seed)
    for i in range(n):
        yield ArithProblem(id=f"arith-{seed}-{i}", terms=random_terms(rng, min_terms, max_terms))


def held_out_terms() -> set[tuple[int, ...]]:
    """Every problem of the evaluation and demo sets; training never sees them."""
    return {
        p.terms
        for seed, n in ((EVAL_SEED, EVAL_N), (DEMO_SEED, DEMO_N))
        for p in make_problems(n, seed)
    }


def terms_of(question: str) -> tuple[int, ...]:
    """The terms of a lab question ("What is 3 + 4 + 2?")."""
    return tuple(int(x) for x in question.removeprefix("What is ").rstrip("?").split(" + "))


def step_checks(terms: tuple[int, ...], lines: list[str]) -> list[bool]:
    """For each of `lines` (a trace's steps, headers included or not) up to the first
    that is not a sum: does it rewrite the line before with its first addition done
    right and the rest copied?"""
    prev, checks = list(terms), []
    for line in lines:
        body = line.partition(".")[2] if line.startswith("###") else line
        try:
            now = [int(x) for x in body.split(" + ")]
        except ValueError:
            break
        checks.append(len(prev) > 1 and now == [prev[0] + prev[1], *prev[2:]])
        prev = now
    return checks


def valid_steps(terms: tuple[int, ...], lines: list[str]) -> int:
    """How many of `lines` are right rewrites (`step_checks`); a trace's process is sound
    when all are, whatever its final answer."""
    return sum(step_checks(terms, lines))


def solution_lines(terms: tuple[int, ...]) -> list[str]:
    """The lines after each step: the first two terms added, the rest copied."""
    return weak_lines(terms, None, 0.0, random.Random(0))


def as_steps(lines: list[str]) -> list[str]:
    return [f"{step_header(i)} {line}" for i, line in enumerate(lines, start=1)]


def solution_steps(terms: tuple[int, ...]) -> list[str]:
    return as_steps(solution_lines(terms))


# -- the teachers' weaknesses: which additions a teacher gets wrong, and how ----------
def carries(a: int, b: int) -> bool:
    return a % 10 + b >= 10


Rule = Callable[[int, int], bool]
WEAKNESSES: dict[str, tuple[Rule, int, str]] = {
    "carry": (carries, -10, "forgets the carry (17 + 5 -> 12)"),
    "no_carry": (lambda a, b: not carries(a, b), +10, "invents a carry (12 + 3 -> 25)"),
    "large": (lambda a, b: a >= 30, -10, "drops ten once the total reaches 30 (34 + 2 -> 26)"),
    # The student's own (`cord-lab student`): no teacher shares it.
    "sevens": (lambda a, b: b >= 7, -1, "counts one short adding 7, 8 or 9 (15 + 8 -> 22)"),
}


def weak_lines(
    terms: tuple[int, ...], weakness: str | None, rate: float, rng: random.Random
) -> list[str]:
    """The lines a teacher with `weakness` writes: each addition it is weak at comes out
    wrong with probability `rate`; later steps carry the wrong total on faithfully."""
    current = list(terms)
    lines = []
    for _ in range(len(terms) - 1):
        a, b = current[0], current[1]
        total = a + b
        if weakness is not None:
            applies, shift, _ = WEAKNESSES[weakness]
            if applies(a, b) and rng.random() < rate:
                total += shift
        current = [total, *current[2:]]
        lines.append(" + ".join(map(str, current)))
    return lines


def final_answer_text(answer: str) -> str:
    return f"The final answer is {answer}."
