"""The rows a run writes, as models: the line on disk, a problem's own fields beside the
row's, and the one summary of a set of rows."""

import json
import re

import pytest
from pydantic import ValidationError

from cord.coordinator.rows import FailureRow, RowStats, TraceRow, auroc, summarize
from tests.conftest import ROOT
from tests.coordinator.conftest import failure_row, trace_row


def test_a_row_round_trips_and_carries_the_problems_fields():
    row = trace_row(
        "p1", source="lab", level=3, stats={"tokens_by_teacher": {"alpha": 4, "beta": 6}}
    )
    line = row.model_dump_json()
    loaded = json.loads(line)
    assert loaded["source"] == "lab" and loaded["level"] == 3  # at the top level, as input
    assert row.meta == {"source": "lab", "level": 3}
    again = TraceRow.model_validate_json(line)
    assert again == row and again.generated_tokens == 10


def test_the_fields_every_row_has_are_required():
    data = json.loads(trace_row("p1").model_dump_json())
    for field in ("id", "question", "reference_answer", "steps", "final_answer", "score"):
        with pytest.raises(ValidationError, match=field):
            TraceRow.model_validate({k: v for k, v in data.items() if k != field})
    with pytest.raises(ValidationError, match="reason"):
        FailureRow.model_validate({"id": "p", "question": "q", "reference_answer": "1"})


def test_summarize_counts_a_failure_as_wrong():
    steps = [
        {"index": i, "text": "s", "teacher": t, "score": None, "tokens": 1}
        for i, t in enumerate(("alpha", "beta"), start=1)
    ]
    rows = [
        trace_row("a", score=0.9, correct=True, steps=steps, stats={"wall_s": 2.0}),
        trace_row("b", score=0.3, correct=False, steps=steps[:1], stats={"wall_s": 4.0}),
    ]
    s = summarize(rows, [failure_row("c")])
    assert (s.problems, s.traces, s.failed, s.correct) == (3, 2, 1, 1)
    assert s.accuracy == pytest.approx(1 / 3) and s.mean_score == pytest.approx(0.6)
    assert s.auroc == 1.0 and s.mean_steps == 1.5 and s.mean_wall_s == 3.0
    assert s.steps_by_teacher == {"alpha": 2, "beta": 1}
    assert summarize([]).accuracy is None and summarize([]).cache_hit_share is None


def test_auroc_is_the_chance_a_right_trace_scores_above_a_wrong_one():
    assert auroc([0.9, 0.4], [0.5]) == 0.5
    assert auroc([0.5], [0.5]) == 0.5
    assert auroc([0.5], []) is None


def test_the_row_reference_in_the_docs_names_every_field():
    """docs/architecture.md's table of rows lists the models' fields, and no others."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Rows", 1)[1]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    named = {n for line in table for n in re.findall(r"`(\w+)`", line.split("|")[1])}
    stats = next(line for line in table if line.startswith("| `stats`"))
    assert named == set(TraceRow.model_fields)
    assert set(re.findall(r"`(\w+)`", stats.split("|")[2])) == set(RowStats.model_fields)
    failures = section.split("`failed.jsonl`", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`(\w+)`", failures)) == set(FailureRow.model_fields)
