"""The `bench` engine: no model, fixed text at once. For overhead measurement only.

It answers every item immediately, so a fleet running it measures what the fleet itself
costs per item (coordinator, Redis, Celery, messages) and nothing of a model. Its texts
are placeholders and its scores a hash of the item's key: nothing it produces is data.
The run config refuses it outside the benchmark harness (`common/config.py`,
`allow_bench_engine`), and the harness (`ops/bench/fleet.py`) writes its rows to a
temporary folder that it deletes: no row, no figure of quality ever comes from it.

Options ride in the pool's ``model`` field, ``key=value`` pairs separated by commas:

- ``steps`` (default 4): a trajectory ends with ``</think>`` at this step, so searches
  finish after a known number of steps;
- ``tokens`` (default 8): tokens reported per generated step (and per answer);
- ``ms`` (default 0): milliseconds each call takes, so a worker can be stopped while it
  runs a task (the soak benchmark).

Each step's text is ``### Step k. <digest of the key>``: distinct per candidate, so a
beam search keeps its full width (identical texts would collapse the beams).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from cord.common import prompts
from cord.common.messages import (
    AnswerItem,
    EngineStats,
    ExpandItem,
    FinishReason,
    Generation,
    Score,
    ScoreItem,
)
from cord.common.pools import BenchSpec


def parse_options(model: str) -> dict[str, int]:
    """``"steps=6,tokens=8,ms=0"`` (an empty string or ``"bench"`` gives the defaults)."""
    options = {"steps": 4, "tokens": 8, "ms": 0}
    for part in model.split(","):
        part = part.strip()
        if not part or part == "bench":
            continue
        name, sep, value = part.partition("=")
        low = 0 if name == "ms" else 1
        if not sep or name not in options or not value.isdigit() or int(value) < low:
            raise ValueError(
                f"bench engine: bad option {part!r} in model {model!r}; "
                "use e.g. 'steps=4,tokens=8,ms=0' (positive integers; ms may be 0)"
            )
        options[name] = int(value)
    return options


def _digest(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class BenchEngine:
    def __init__(self, spec: BenchSpec) -> None:
        self.name = spec.name
        options = parse_options(spec.model)
        self.steps = options["steps"]
        self.tokens = options["tokens"]
        self.call_s = options["ms"] / 1000
        self.requests = 0
        self.busy_s = 0.0

    def _prompt_tokens(self, steps: list[str]) -> int:
        # What a model would have read: a question's worth, then each step's tokens.
        return 16 + self.tokens * len(steps)

    def expand(self, items: list[ExpandItem]) -> list[Generation]:
        start = time.perf_counter()
        out = []
        for item in items:
            tag = f"{_digest(item.key) % 100_000:05d}"
            finish: FinishReason
            if item.whole:  # the whole trajectory: every step's body, then </think>
                bodies = [f" {tag}"] + [
                    f"\n{prompts.step_header(k)} {tag}" for k in range(2, self.steps + 1)
                ]
                text, finish, tokens = "".join(bodies), "think_end", self.tokens * self.steps
            else:
                text, tokens = f" {tag}", self.tokens
                finish = "think_end" if item.next_step >= self.steps else "step"
            out.append(
                Generation(
                    key=item.key,
                    text=text,
                    finish=finish,
                    tokens=min(tokens, item.max_new_tokens),
                    prompt_tokens=self._prompt_tokens(item.steps),
                )
            )
        self._count(items, start)
        return out

    def answer(self, items: list[AnswerItem]) -> list[Generation]:
        start = time.perf_counter()
        out = [
            Generation(
                key=i.key,
                text=" The final answer is 0.",
                finish="eos",
                tokens=min(self.tokens, i.max_new_tokens),
                prompt_tokens=self._prompt_tokens(i.steps),
            )
            for i in items
        ]
        self._count(items, start)
        return out

    def score(self, items: list[ScoreItem]) -> list[Score]:
        start = time.perf_counter()
        out = [
            Score(
                key=i.key,
                score=(_digest(i.key) % 1_000_000 + 1) / 1_000_002,
                answer_tokens=1,
                prompt_tokens=self._prompt_tokens(i.steps),
            )
            for i in items
        ]
        self._count(items, start)
        return out

    def _count(self, items: list[Any], start: float) -> None:
        if self.call_s:
            time.sleep(self.call_s)
        self.requests += len(items)
        self.busy_s += time.perf_counter() - start

    def stats(self) -> EngineStats:
        return EngineStats(requests=self.requests, busy_s=round(self.busy_s, 3), engine="bench")
