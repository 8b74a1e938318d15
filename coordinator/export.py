"""``cord-coord export``: a run's traces as a training set for TRL's SFTTrainer.

One row per trace (failures are never exported), with the conversation in both of the
forms SFTTrainer takes:

- ``messages``: ``[user, assistant]``, TRL's conversational language-modeling type;
- ``prompt`` / ``completion``: ``[user]`` / ``[assistant]``, its conversational
  prompt-completion type.

Given both, SFTTrainer tokenizes the prompt-completion pair (its tokenizing step checks
for ``prompt`` first) and, as `completion_only_loss` defaults to True when a dataset
has ``prompt`` and ``completion``, puts the loss on the assistant turn only: the
``<think>`` trace and the answer, not the question (trl/trainer/sft_trainer.py; checked
by training the lab's alpha for two steps with TRL 1.16.0 on an export of each kind).
To train on the whole conversation instead, drop the pair:
``dataset.remove_columns(["prompt", "completion"])``; to keep only the pair,
``dataset.remove_columns("messages")``. The provenance columns never reach the model
(the trainer keeps only the columns it built).

Every format has the same columns and types (`SCHEMA`): ``jsonl`` (one JSON object per
line, `load_dataset("json", data_files=...)`), ``parquet`` (one file written by pyarrow,
`load_dataset("parquet", data_files=...)`), ``hf`` (a `Dataset.save_to_disk` folder,
`load_from_disk`). A problem's own extra input fields are not exported (their types
differ between problems, which Parquet cannot hold in one column).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from cord.coordinator.rows import TraceRow
from cord.coordinator.rundir import RunDir

Format = Literal["jsonl", "parquet", "hf"]
FORMATS: tuple[Format, ...] = ("jsonl", "parquet", "hf")

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.list_(_MESSAGE)),
        ("prompt", pa.list_(_MESSAGE)),
        ("completion", pa.list_(_MESSAGE)),
        ("question", pa.string()),
        ("reference_answer", pa.string()),
        ("final_answer", pa.string()),
        ("correct", pa.bool_()),
        ("correct_by", pa.string()),
        ("score", pa.float64()),
        ("strategy", pa.string()),
        ("teachers", pa.list_(pa.string())),
        ("answer_teacher", pa.string()),
        ("steps", pa.int64()),
        ("thinking_tokens", pa.int64()),
        ("answer_tokens", pa.int64()),
        ("generated_tokens", pa.int64()),
        (
            "tokens_by_teacher",
            pa.list_(pa.struct([("teacher", pa.string()), ("tokens", pa.int64())])),
        ),
        ("wall_s", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


class ExportError(Exception):
    pass


@dataclass
class ExportResult:
    path: Path
    written: int
    total: int
    not_correct: int  # dropped by --correct-only
    below_score: int  # dropped by --min-score (among those --correct-only kept)
    failed: int  # problems of the run that have no trace (never exported)

    @property
    def filtered(self) -> int:
        return self.total - self.written


def training_row(row: TraceRow) -> dict[str, Any]:
    """One trace row as a training-set row (`SCHEMA`). The row must carry its verdict
    (`rundir` gives rows of older runs theirs)."""
    messages = [m.model_dump() for m in row.messages]
    by_teacher = row.stats.tokens_by_teacher
    return {
        "id": row.id,
        "messages": messages,
        "prompt": messages[:-1],
        "completion": messages[-1:],
        "question": row.question,
        "reference_answer": row.reference_answer,
        "final_answer": row.final_answer,
        "correct": row.right,
        "correct_by": row.correct_by,
        "score": row.score,
        "strategy": row.strategy,
        "teachers": row.teachers,
        "answer_teacher": row.answer_teacher,
        "steps": len(row.steps),
        "thinking_tokens": row.stats.thinking_tokens,
        "answer_tokens": row.stats.answer_tokens,
        "generated_tokens": row.generated_tokens,
        "tokens_by_teacher": [{"teacher": t, "tokens": n} for t, n in by_teacher.items()],
        "wall_s": row.stats.wall_s,
    }


def select(
    rows: list[TraceRow], correct_only: bool = False, min_score: float | None = None
) -> tuple[list[TraceRow], int, int]:
    """The rows the filters keep, and how many each filter dropped (--correct-only
    first, then --min-score among the rest)."""
    kept, not_correct, below = [], 0, 0
    for row in rows:
        if correct_only and not row.right:
            not_correct += 1
        elif min_score is not None and row.score < min_score:
            below += 1
        else:
            kept.append(row)
    return kept, not_correct, below


def export(
    run: RunDir,
    out: str | Path,
    fmt: Format,
    correct_only: bool = False,
    min_score: float | None = None,
    strategies: list[str] | None = None,
    force: bool = False,
) -> ExportResult:
    """Write the run's traces that pass the filters to `out` in format `fmt`. An existing
    `out` is refused unless `force`, and is replaced only once the new one is complete."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_target(out, run, force)
    runs = run.runs
    if strategies:
        unknown = sorted(set(strategies) - set(run.strategies))
        if unknown:
            has = ", ".join(run.strategies)
            raise ExportError(f"no strategy {', '.join(unknown)} in {run.path}; it has {has}")
        runs = [r for r in runs if r.strategy in strategies]
    rows = [row for r in runs for row in r.traces]
    kept, not_correct, below = select(rows, correct_only, min_score)
    table = pa.Table.from_pylist([training_row(r) for r in kept], schema=SCHEMA)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        _write(table, tmp, fmt)
        _remove(out)
        tmp.rename(out)
    finally:
        _remove(tmp)
    return ExportResult(
        out, len(kept), len(rows), not_correct, below, sum(len(r.failed) for r in runs)
    )


def _write(table: pa.Table, path: Path, fmt: Format) -> None:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a CLI that prints one line when done
        try:
            datasets.Dataset(table).save_to_disk(str(path))
        finally:
            if bars:
                datasets.enable_progress_bars()


def _check_target(out: Path, run: RunDir, force: bool) -> None:
    """Never replace the rows themselves: the run folder, a folder above it, or one of
    its JSONL files."""
    resolved, src = out.resolve(), run.path.resolve()
    files = {(r.folder / name).resolve() for r in run.runs for name in r.files}
    if resolved == src or resolved in src.parents or resolved in files:
        raise ExportError(f"--out {out} would replace the run's own rows ({run.path})")
    if (out.exists() or out.is_symlink()) and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
