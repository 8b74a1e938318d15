"""Sources in every format, made here with the libraries users make them with (pyarrow,
datasets, csv), read through `open_source`: field mapping, references extracted as GSM8K
and MATH write them, bad rows named by row and field, whole-source errors."""

import csv
import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cord.common.config import InputSpec
from cord.coordinator.inputs.problems import default_id
from cord.coordinator.inputs.sources import SourceError, open_source, read_problems

GSM8K = {
    "question": [
        "Natalia sold clips to 48 of her friends in April, and then half as many in May. "
        "How many clips did she sell altogether?",
        "Weng earns $12 an hour for babysitting. How much did she earn for 100 hours?",
        "A shop sold 3 crates. How many?",
    ],
    "answer": [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
        "She earned 12 * 100 = 1200.\n#### 1,200",
        "It sold 3. No final line here.",
    ],
}
MATH = {
    "problem": ["What is $\\frac{2}{4}$?", "Solve $x+1=4$.", "Simplify $\\sqrt{a^2}$."],
    "solution": [
        "We reduce: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
        "First $x = \\boxed{2}$ is wrong; subtracting gives $\\boxed{x = \\{3\\}}$.",
        "It is $|a|$, but the box was never closed: \\boxed{|a|",
    ],
    "level": ["Level 1", "Level 2", "Level 3"],
    "type": ["Prealgebra", "Algebra", "Algebra"],
    "unique_id": ["test/prealgebra/1.json", "test/algebra/2.json", "test/algebra/3.json"],
}
GSM8K_SPEC = InputSpec(answer_from="gsm8k")
MATH_SPEC = InputSpec(
    question_field="problem", answer_field="solution", answer_from="boxed", id_field="unique_id"
)


def parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def errors_by_row(errors):
    return {(e.unit, e.line, e.field): e.problem for e in errors}


def test_gsm8k_parquet_takes_the_text_after_the_last_hashes(tmp_path):
    path = parquet(tmp_path / "gsm8k.parquet", GSM8K)
    problems, errors = read_problems(path, GSM8K_SPEC)
    assert [p.answer for p in problems] == ["72", "1200"]
    assert [p.id for p in problems] == [default_id(q) for q in GSM8K["question"][:2]]
    # The worked solution the reference came from is kept with the problem.
    assert problems[0].meta == {"answer": GSM8K["answer"][0]}
    assert errors_by_row(errors) == {
        ("row", 3, "answer"): "has no `#### <answer>` line (--answer-from gsm8k)"
    }
    assert str(errors[0]).startswith("row 3, field `answer`: has no `#### <answer>` line")


def test_math_parquet_takes_the_last_boxed_with_nested_braces(tmp_path):
    path = parquet(tmp_path / "math.parquet", MATH)
    problems, errors = read_problems(path, MATH_SPEC)
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("test/prealgebra/1.json", MATH["problem"][0], "\\frac{1}{2}"),
        ("test/algebra/2.json", MATH["problem"][1], "x = \\{3\\}"),
    ]
    assert problems[0].meta == {
        "solution": MATH["solution"][0],
        "level": "Level 1",
        "type": "Prealgebra",
    }
    assert errors_by_row(errors) == {
        ("row", 3, "solution"): "has no complete `\\boxed{...}` (--answer-from boxed)"
    }


def test_a_field_no_row_has_is_one_error_naming_the_columns(tmp_path):
    path = parquet(tmp_path / "math.parquet", MATH)
    with pytest.raises(SourceError) as e:
        open_source(path)  # MATH has `problem` but no `answer`
    assert "no column `answer` for the answer" in str(e.value)
    assert "problem, solution, level, type, unique_id" in str(e.value)
    assert "--answer-field" in str(e.value)
    with pytest.raises(SourceError, match="no column `idx` for the id"):
        open_source(path, MATH_SPEC.model_copy(update={"id_field": "idx"}))


def test_numbers_are_not_text_in_any_format(tmp_path):
    """A typed column of numbers is refused like a JSON number: the question and the
    reference are text."""
    path = parquet(tmp_path / "n.parquet", {"question": ["q1", "q2"], "answer": [4, None]})
    problems, errors = read_problems(path)
    assert problems == []
    assert errors_by_row(errors) == {
        ("row", 1, "answer"): "must be text, got int",
        ("row", 2, "answer"): "must be text, got null",
    }
    path = tmp_path / "n.json"
    path.write_text(json.dumps([{"question": 7, "answer": "7"}, {"question": "q", "answer": "1"}]))
    problems, errors = read_problems(path)
    assert [p.question for p in problems] == ["q"]
    assert errors_by_row(errors) == {("row", 1, "question"): "must be text, got int"}


def test_csv_rows_are_counted_after_the_header(tmp_path):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # a BOM, as spreadsheets write
        w = csv.writer(f)
        w.writerow(["id", "question", "answer", "source"])
        w.writerow(["a", "What is 1, then 2?", "3", "lab"])
        w.writerow(["b", "Blank answer", "", "lab"])
        w.writerow(["c", "Short row"])
        w.writerow(["d", "Multi\nline", "5", "lab"])
        w.writerow(["a", "Same id", "6", "lab"])
    problems, errors = read_problems(path)
    assert [(p.id, p.question, p.answer, p.meta) for p in problems] == [
        ("a", "What is 1, then 2?", "3", {"source": "lab"}),
        ("d", "Multi\nline", "5", {"source": "lab"}),
    ]
    assert errors_by_row(errors) == {
        ("row", 2, "answer"): "is empty",
        ("row", 3, None): "has fewer cells than the header's 4",
        ("row", 5, "id"): "duplicate id 'a' (first on row 1)",
    }


def test_json_array_wrapper_and_json_lines_under_a_json_name(tmp_path):
    rows = [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2", "k": 1}]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows, indent=2))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": rows}))
    lines = tmp_path / "l.json"
    datasets.Dataset.from_list(rows).to_json(lines)  # datasets writes JSON Lines
    for path, kind in ((array, "json"), (wrapped, "json"), (lines, "jsonl")):
        src = open_source(path)
        assert src.kind == kind
        problems, errors = read_problems(path)
        assert errors == [] and [p.answer for p in problems] == ["1", "2"]
    assert read_problems(array)[0][1].meta == {"k": 1}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q1", "answer": "1"}, [2], {"question": "q3"}]))
    problems, errors = read_problems(bad)
    assert len(problems) == 1
    assert errors_by_row(errors) == {
        ("row", 2, None): "a JSON list is not an object",
        ("row", 3, "answer"): "missing",
    }


def test_save_to_disk_folders_and_their_splits(tmp_path):
    train = datasets.Dataset.from_dict(
        {"problem": ["p1", "p2"], "solution": ["\\boxed{1}", "\\boxed{2}"]}
    )
    test = datasets.Dataset.from_dict({"problem": ["p3"], "solution": ["\\boxed{3}"]})
    spec = InputSpec(question_field="problem", answer_field="solution", answer_from="boxed")
    train.save_to_disk(tmp_path / "one")
    assert [p.answer for p in read_problems(tmp_path / "one", spec)[0]] == ["1", "2"]
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "two")
    with pytest.raises(
        SourceError, match=r"has splits \['train', 'test'\]; choose one with --split"
    ):
        open_source(tmp_path / "two", spec)
    with pytest.raises(SourceError, match=r"no split 'valid'; choose one of \['train', 'test'\]"):
        open_source(tmp_path / "two", spec.model_copy(update={"split": "valid"}))
    test_spec = InputSpec.model_validate({**spec.model_dump(), "split": "test"})
    src = open_source(tmp_path / "two", test_spec)
    assert src.describe().endswith("(datasets folder (save_to_disk), split test)")
    assert [p.question for p in read_problems(tmp_path / "two", test_spec)[0]] == ["p3"]


def _cache_as_the_hub_leaves_it(cache: Path, name: str, config: str, split: str, rows) -> None:
    """What `load_dataset(name, config)` leaves in the datasets cache after a download:
    the Arrow files of its splits under `<owner>___<name>/<config>/<version>/<hash>`.
    Built here with datasets' own builder on a local Parquet file, then moved to the
    folder the Hub dataset's name maps to (this machine never reaches the Hub)."""
    source = cache.parent / "hub-download.parquet"
    parquet(source, rows)
    datasets.load_dataset("parquet", data_files={split: str(source)}, cache_dir=str(cache))
    built = next((cache / "parquet").glob("*/*/*/dataset_info.json")).parent
    owner, _, short = name.partition("/")
    target = cache / f"{owner}___{short}" / config / built.parent.name / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("parquet-", f"{short}-")))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(dataset_name=short, config_name=config)
    (target / "dataset_info.json").write_text(json.dumps(info))


def test_a_hub_name_offline_reads_the_local_cache_or_says_it_is_not_there(tmp_path, monkeypatch):
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    # Offline as on a machine without the Hub (set here too, so the test leaves the
    # process as it found it: `open_source` switches them on when the Hub is away).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _cache_as_the_hub_leaves_it(cache, "someone/gsm8k-mini", "main", "test", GSM8K)
    spec = InputSpec(answer_from="gsm8k", subset="main", split="test")
    src = open_source("someone/gsm8k-mini", spec)
    assert src.kind == "hub"
    assert src.describe() == "someone/gsm8k-mini (Hub dataset, from the local cache, offline)"
    problems, errors = read_problems("someone/gsm8k-mini", spec)
    assert [p.answer for p in problems] == ["72", "1200"] and [e.line for e in errors] == [3]
    assert src.rejects_path() == Path("someone__gsm8k-mini.rejected.jsonl")
    with pytest.raises(SourceError) as e:
        open_source("someone/not-downloaded", spec)
    assert "not in the local datasets cache" in str(e.value)
    assert "the Hub cannot be reached" in str(e.value)


def test_whole_source_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(tmp_path / "missing.parquet")
    (tmp_path / "p.xlsx").write_bytes(b"PK")
    with pytest.raises(SourceError, match=r"unknown format '\.xlsx'"):
        open_source(tmp_path / "p.xlsx")
    (tmp_path / "p.parquet").write_text("not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        open_source(tmp_path / "p.parquet")
    empty = parquet(tmp_path / "e.parquet", {"question": pa.array([], pa.string()), "answer": []})
    problems, errors = read_problems(empty)
    assert problems == [] and "the dataset has no rows" in str(errors[0])
