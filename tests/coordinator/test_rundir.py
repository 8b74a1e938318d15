"""Reading a run's rows back: each row parsed once, rows of older runs judged, a row still
being written left out, anything else named by file and line."""

import pytest

from cord.coordinator.rows import TraceRow
from cord.coordinator.rundir import (
    RunDirError,
    read_failures,
    read_rows,
    read_run_dir,
    read_traces,
)
from tests.coordinator.conftest import failure_row, trace_row


def test_a_rows_verdict_stands_and_rows_without_one_are_judged(tmp_path):
    rows = [
        trace_row("p1", final_answer=r"\frac{1}{2}", reference_answer="0.5"),  # none recorded
        trace_row("p2", final_answer="7", reference_answer="7", correct=False, correct_by="x"),
    ]
    path = tmp_path / "traces.jsonl"
    old = rows[0].model_dump_json(exclude={"correct", "correct_by"})  # as older runs wrote
    path.write_text(old + "\n" + rows[1].model_dump_json() + "\n")
    p1, p2 = read_traces(path)
    assert (p1.correct, p1.correct_by) == (True, "math-verify")
    assert (p2.correct, p2.correct_by) == (False, "x")  # the coordinator's verdict stands
    again = read_traces(path, "exact")  # --match: every row judged again
    assert [(r.correct, r.correct_by) for r in again] == [(False, "exact"), (True, "exact")]


def test_a_torn_last_line_is_left_out_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "traces.jsonl"
    whole = trace_row("p1").model_dump_json() + "\n"
    path.write_text(whole + whole[:40])
    assert [r.id for r in read_traces(path)] == ["p1"]
    path.write_text(whole + '{"id": "p2"}\n')
    with pytest.raises(RunDirError, match=r"traces\.jsonl:2: not a row \(question: Field"):
        read_traces(path)
    bad: list[str] = []
    path.write_text("{nope\n" + whole)
    assert [r.id for r in read_rows(path, TraceRow, bad)] == ["p1"]  # the chaos check's way
    (error,) = bad
    assert error.endswith("traces.jsonl:1: not JSON (Expecting property name enclosed in "
                          "double quotes)")  # fmt: skip


def test_an_eval_folder_reads_one_run_per_strategy(tmp_path):
    for strategy in ("curation", "cord"):
        folder = tmp_path / strategy
        folder.mkdir()
        (folder / "traces.jsonl").write_text(
            trace_row("p1", strategy=strategy).model_dump_json() + "\n"
        )
        (folder / "failed.jsonl").write_text(
            failure_row("p2", strategy=strategy).model_dump_json() + "\n"
        )
    run = read_run_dir(tmp_path)
    assert run.strategies == ["cord", "curation"]  # CoRD first
    assert [r.problems for r in run.runs] == [2, 2]
    assert [r.reason for r in read_failures(tmp_path / "cord" / "failed.jsonl")] == ["it failed"]
