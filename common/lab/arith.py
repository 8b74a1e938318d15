"""Arithmetic problems with many short steps: "What is 3 + 4 + 2 + 9 + 5?".

Each step rewrites the previous line with the first addition done, which needs only
local work and copying (tiny models can learn it on a CPU):

    ### Step 1. 7 + 2 + 9 + 5
    ### Step 2. 9 + 9 + 5
    ### Step 3. 18 + 5
    ### Step 4. 23

`make_problems(n, seed)` is deterministic; training and evaluation use disjoint seeds.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from cord.common.prompts import step_header

MIN_TERMS, MAX_TERMS = 4, 12
_NUMBER = re.compile(r"-?\d+")


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


def make_problems(
    n: int, seed: int, min_terms: int = MIN_TERMS, max_terms: int = MAX_TERMS
) -> list[ArithProblem]:
    rng = random.Random(seed)
    return [
        ArithProblem(
            id=f"arith-{seed}-{i}",
            terms=tuple(rng.randint(1, 9) for _ in range(rng.randint(min_terms, max_terms))),
        )
        for i in range(n)
    ]


def solution_lines(terms: tuple[int, ...]) -> list[str]:
    """The lines after each step: the first two terms added, the rest copied."""
    current = list(terms)
    lines = []
    while len(current) > 1:
        current = [current[0] + current[1], *current[2:]]
        lines.append(" + ".join(map(str, current)))
    return lines


def solution_steps(terms: tuple[int, ...]) -> list[str]:
    return [f"{step_header(i)} {line}" for i, line in enumerate(solution_lines(terms), start=1)]


def final_answer_text(answer: str) -> str:
    return f"The final answer is {answer}."


def extract_answer(text: str) -> str | None:
    """The number a final answer states ("The final answer is 23." -> "23")."""
    match = re.search(r"final answer is\s*(-?\d+)", text)
    if match:
        return match.group(1)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None
