"""A real run to read back: `cord-coord eval`'s code path (cord and curation on five lab
problems through the session's fleet), run once for the export and report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cord.common.config import RunConfig
from cord.coordinator.evaluate import evaluate
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import FailureRow, TraceRow
from cord.lab.arith import make_problems
from tests.conftest import fleet_config

EVAL_STRATEGIES = ("cord", "curation")


@pytest.fixture(scope="session")
def lab_eval(fleet: tuple[Path, RunConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eval folder (``<dir>/cord/traces.jsonl``, ``<dir>/curation/…``) of five lab
    problems; `eval`'s own state namespace keeps it apart from other tests' problems."""
    tmp = tmp_path_factory.mktemp("lab-eval")
    _, cfg = fleet_config(fleet, tmp / "run.yaml")
    problems = [Problem(**p.to_json()) for p in make_problems(5, seed=7171)]
    report: dict[str, Any] = evaluate(cfg, problems, list(EVAL_STRATEGIES), tmp / "ev")
    assert all(m["failed"] == 0 for m in report["strategies"].values()), report
    return tmp / "ev"


def trace_row(pid: str, **fields: Any) -> TraceRow:
    """A trace row with every field a row must have, `fields` over them (and, as a
    problem's own input fields do, beside them)."""
    base: dict[str, Any] = {
        "id": pid,
        "question": f"question of {pid}",
        "reference_answer": "7",
        "steps": [],
        "final_answer": "The final answer is 7.",
        "score": 0.5,
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    return TraceRow.model_validate({**base, **fields})


def failure_row(pid: str, reason: str = "it failed", **fields: Any) -> FailureRow:
    return FailureRow.model_validate(
        {"id": pid, "question": f"question of {pid}", "reference_answer": "7", "reason": reason}
        | fields
    )
