"""The demo's summary of the rows."""

from cord.coordinator.demo import print_summary
from cord.coordinator.rows import summarize
from cord.coordinator.rundir import read_failures, read_traces
from tests.coordinator.conftest import trace_row


def test_the_summary_reads_each_rows_verdict(tmp_path, capsys):
    def row(pid, final, reference, **extra):
        return trace_row(
            pid,
            reference_answer=reference,
            final_answer=final,
            steps=[{"index": 1, "text": "s", "teacher": "alpha", "score": 0.5, "tokens": 1}],
            stats={"prompt_tokens": 10, "cached_prompt_tokens": 5},
            **extra,
        )

    rows = [
        row("p1", "The final answer is 46.", "46", correct=True, correct_by="math-verify"),
        row("p2", "The final answer is 46.", "46", correct=False, correct_by="exact"),
        row("p3", r"so \boxed{\frac{1}{2}}", "0.5"),  # no verdict: judged as rundir does
    ]
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(r.model_dump_json() + "\n" for r in rows))
    read = read_traces(traces)
    summary = summarize(read, read_failures(tmp_path / "failed.jsonl"))
    assert summary.accuracy == 2 / 3 and summary.failed == 0
    assert summary.cache_hit_share == 0.5 and summary.steps_by_teacher == {"alpha": 3}
    print_summary(read, summary, traces, 1.0)
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    assert lines["p1"][1:4] == ["46", "46", "yes"]
    assert lines["p2"][1:4] == ["46", "46", "no"]
    assert lines["p3"][1:4] == ["0.5", r"\frac{1}", "yes"]  # the answer column: 8 characters
    assert lines["traces"][1:] == [
        "3,", "failed", "0,", "answer", "accuracy", "0.667,", "mean", "S", "0.5,", "mean",
        "steps", "1.0",
    ]  # fmt: skip
