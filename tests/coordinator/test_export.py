"""`cord-coord export`: a real run's traces as a training set, loaded back with
`datasets` in every format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cord.coordinator.cli import main
from cord.coordinator.export import COLUMNS
from cord.coordinator.matching import judge
from tests.coordinator.conftest import EVAL_STRATEGIES

LOADERS = {"jsonl": "json", "parquet": "parquet"}


def raw_traces(folder: Path) -> list[dict[str, Any]]:
    """The rows as the run wrote them (read here without the code under test)."""
    rows = []
    for path in sorted(folder.glob("**/traces.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows


def verdict(row: dict[str, Any]) -> bool:
    if isinstance(row.get("correct"), bool):
        return bool(row["correct"])
    return judge(row["final_answer"], row["reference_answer"]).correct


def export(*args: str) -> Any:
    return CliRunner().invoke(main, ["export", *args], catch_exceptions=False)


def load(path: Path, fmt: str) -> Any:
    import datasets

    if fmt == "hf":
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(LOADERS[fmt], data_files=str(path), split="train")
    return ds


def by_key(rows: Any) -> dict[tuple[str, str], dict[str, Any]]:
    out = {(r["strategy"], r["id"]): r for r in rows}
    assert len(out) == len(rows), "one row per (strategy, problem)"
    return out


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_each_format_loads_back_one_to_one(lab_eval, tmp_path, fmt):
    out = tmp_path / f"train.{fmt}"
    result = export("--in", str(lab_eval), "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    traces = raw_traces(lab_eval)
    assert f"wrote {len(traces)} of {len(traces)} traces" in result.output

    ds = load(out, fmt)
    assert ds.column_names == list(COLUMNS)
    got, want = by_key(ds.to_list()), by_key(traces)
    assert set(got) == set(want)
    assert {s for s, _ in got} == set(EVAL_STRATEGIES)
    for key, t in want.items():
        r = got[key]
        assert r["messages"] == t["messages"]
        assert r["prompt"] == t["messages"][:1] and r["prompt"][0]["role"] == "user"
        assert r["completion"] == t["messages"][1:]
        assert r["completion"][0]["content"].startswith("<think>\n### Step 1.")
        assert r["score"] == t["score"]  # exactly: no float formatting on the way
        assert r["teachers"] == [s["teacher"] for s in t["steps"]]
        assert r["answer_teacher"] == t["answer_teacher"]
        assert r["final_answer"] == t["final_answer"]
        assert r["reference_answer"] == t["reference_answer"]
        assert r["correct"] == verdict(t)
        assert r["correct_by"] in {"math-verify", "exact", "exact-fallback"}
        by_teacher = t["stats"]["tokens_by_teacher"]
        assert {x["teacher"]: x["tokens"] for x in r["tokens_by_teacher"]} == by_teacher
        assert r["generated_tokens"] == sum(by_teacher.values())
        assert r["thinking_tokens"] == t["stats"]["thinking_tokens"]
        assert r["answer_tokens"] == t["stats"]["answer_tokens"]
        assert r["steps"] == len(t["steps"])


@pytest.mark.redis
@pytest.mark.slow
def test_filters_drop_exactly_the_rows_they_should(lab_eval, tmp_path):
    traces = raw_traces(lab_eval)
    scores = sorted(t["score"] for t in traces)
    cut = scores[len(scores) // 2]  # the median: some rows on each side
    want = {(t["strategy"], t["id"]) for t in traces if verdict(t) and t["score"] >= cut}
    not_correct = sum(not verdict(t) for t in traces)
    below = sum(verdict(t) and t["score"] < cut for t in traces)
    assert not_correct > 0 and below > 0, "the run should exercise both filters"

    out = tmp_path / "train.parquet"
    args = ["--in", str(lab_eval), "--format", "parquet", "--out", str(out)]
    result = export(*args, "--correct-only", "--min-score", repr(cut))
    assert result.exit_code == 0, result.output
    assert (
        f"wrote {len(want)} of {len(traces)} traces to {out} (parquet); filtered out "
        f"{len(traces) - len(want)} ({not_correct} not correct, {below} with S below {cut:g})"
    ) in result.output
    assert set(by_key(load(out, "parquet").to_list())) == want

    # one filter alone
    out2 = tmp_path / "min.jsonl"
    assert (
        export("--in", str(lab_eval), "--out", str(out2), "--min-score", repr(cut)).exit_code == 0
    )
    assert set(by_key(load(out2, "jsonl").to_list())) == {
        (t["strategy"], t["id"]) for t in traces if t["score"] >= cut
    }


@pytest.mark.redis
@pytest.mark.slow
def test_a_run_folder_a_strategy_and_rows_without_a_verdict(lab_eval, tmp_path):
    # A run's own folder (what `cord-coord run --out` writes), from before rows carried
    # `correct`: the verdicts are computed on export, the way a run judges now.
    old = tmp_path / "old-run"
    old.mkdir()
    rows = raw_traces(lab_eval / "cord")
    with open(old / "traces.jsonl", "w") as f:
        for row in rows:
            f.write(
                json.dumps({k: v for k, v in row.items() if k not in {"correct", "correct_by"}})
            )
            f.write("\n")
    out = tmp_path / "old.jsonl"
    assert export("--in", str(old), "--out", str(out)).exit_code == 0
    got = by_key(load(out, "jsonl").to_list())
    assert set(got) == {("cord", r["id"]) for r in rows}
    for r in rows:
        v = judge(r["final_answer"], r["reference_answer"])
        assert (got["cord", r["id"]]["correct"], got["cord", r["id"]]["correct_by"]) == (
            v.correct,
            v.by,
        )

    # --strategy picks one strategy's rows out of an eval folder
    out = tmp_path / "cur.hf"
    result = export(
        "--in", str(lab_eval), "--format", "hf", "--out", str(out), "--strategy", "curation"
    )
    assert result.exit_code == 0, result.output
    assert set(by_key(load(out, "hf").to_list())) == {
        ("curation", r["id"]) for r in raw_traces(lab_eval / "curation")
    }
    bad = export("--in", str(lab_eval), "--out", str(tmp_path / "x.jsonl"), "--strategy", "mcts")
    assert bad.exit_code == 2 and "no strategy mcts" in bad.output


# -- without a fleet ------------------------------------------------------------------
def a_row(pid: str, score: float = 0.5) -> dict[str, Any]:
    return {
        "id": pid,
        "question": "What is 1 + 1?",
        "reference_answer": "2",
        "strategy": "cord",
        "steps": [
            {"index": 1, "text": "### Step 1. 2", "teacher": "alpha", "score": 0.5, "tokens": 3}
        ],
        "final_answer": "The final answer is 2.",
        "answer_teacher": "alpha",
        "score": score,
        "messages": [
            {"role": "user", "content": "What is 1 + 1?"},
            {
                "role": "assistant",
                "content": "<think>\n### Step 1. 2\n</think>\n\nThe final answer is 2.",
            },
        ],
        "stats": {
            "tokens_by_teacher": {"alpha": 9},
            "wall_s": 0.1,
            "thinking_tokens": 3,
            "answer_tokens": 6,
        },
    }


def test_refuses_a_folder_without_traces_and_an_existing_out(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = export("--in", str(empty), "--out", str(tmp_path / "t.jsonl"))
    assert result.exit_code == 2
    assert "no traces.jsonl in" in result.output and "--in" in result.output

    run = tmp_path / "run"
    run.mkdir()
    (run / "traces.jsonl").write_text("")
    failure = {"id": "p1", "question": "q", "reference_answer": "1", "reason": "x"}
    (run / "failed.jsonl").write_text(json.dumps(failure) + "\n")
    result = export("--in", str(run), "--out", str(tmp_path / "t.jsonl"))
    assert result.exit_code == 2 and "hold no traces (1 problem(s) failed" in result.output

    (run / "traces.jsonl").write_text(json.dumps(a_row("p2")) + "\n")
    out = tmp_path / "t.jsonl"
    out.write_text("keep me\n")
    result = export("--in", str(run), "--out", str(out))
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert out.read_text() == "keep me\n"
    result = export("--in", str(run), "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert "1 failed problem(s) have no trace" in result.output
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p2"]

    # never the run's own rows, even with --force
    for target in (run, run / "traces.jsonl", tmp_path):
        result = export("--in", str(run), "--out", str(target), "--force")
        assert result.exit_code == 2 and "would replace the run's own rows" in result.output
    assert (run / "traces.jsonl").exists()


def test_custom_prefixes_and_a_row_still_being_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    whole = json.dumps(a_row("p1")) + "\n"
    (run / "rows.jsonl").write_text(whole + whole[: len(whole) // 2].replace("p1", "p9"))
    out = tmp_path / "t.parquet"
    args = ["--in", str(run), "--out", str(out), "--format", "parquet"]
    assert export(*args).exit_code == 2  # no traces.jsonl
    result = export(*args, "--traces-prefix", "rows")
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in load(out, "parquet").to_list()] == ["p1"]

    (run / "rows.jsonl").write_text("{not json\n" + whole)
    result = CliRunner().invoke(main, ["export", *args, "--force", "--traces-prefix", "rows"])
    assert result.exit_code == 2 and "rows.jsonl:1: not JSON" in result.output
    shutil.rmtree(run)
