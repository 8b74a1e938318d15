"""Reading a finished run's rows back: the one reader behind `export` and `report`.

A run folder is either what `cord-coord run` writes (``traces.jsonl`` and
``failed.jsonl``, under the prefixes of ``output.traces_prefix`` / ``failed_prefix``) or
what `cord-coord eval` writes (one such folder per strategy). Rows keep the verdict
they were written with (``correct``, ``correct_by``); rows of older runs, written before
verdicts were, are judged here, the way a run judges them now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cord.coordinator.matching import MatchMethod, judge


class RunDirError(Exception):
    """The folder holds no rows to read, or a line that is not a row."""


@dataclass
class StrategyRun:
    """The rows of one strategy: a run folder, or one strategy's folder of an eval."""

    strategy: str
    folder: Path
    traces: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    files: tuple[str, str] = ("traces.jsonl", "failed.jsonl")  # the names read in `folder`

    @property
    def problems(self) -> int:
        return len({str(r["id"]) for r in (*self.traces, *self.failed)})


@dataclass
class RunDir:
    path: Path
    runs: list[StrategyRun]

    @property
    def traces(self) -> list[dict[str, Any]]:
        return [row for run in self.runs for row in run.traces]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for run in self.runs for row in run.failed]

    @property
    def strategies(self) -> list[str]:
        return [run.strategy for run in self.runs]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file. An unterminated last line that does not parse is a row
    still being written (a run in progress) and is left out; any other bad line is an
    error naming the file and line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: torn, or still being written
                break
            raise RunDirError(f"{path}:{number}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or "id" not in row:
            raise RunDirError(f"{path}:{number}: not a row (an object with an id)")
        rows.append(row)
    return rows


def read_run_dir(
    path: str | Path,
    traces_prefix: str = "traces",
    failed_prefix: str = "failed",
    match: MatchMethod | None = None,
) -> RunDir:
    """The rows under `path`: its own ``<traces_prefix>.jsonl`` / ``<failed_prefix>.jsonl``,
    or else those of each subfolder that has a traces file (an eval folder, CoRD first,
    then by name). Every trace row gets ``correct`` and ``correct_by``: its own when it
    has them and `match` is None, else judged with `match` (default ``math``)."""
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"{root} is not a folder")
    traces_name, failed_name = f"{traces_prefix}.jsonl", f"{failed_prefix}.jsonl"
    if (root / traces_name).exists():
        folders = [root]
    else:
        folders = sorted(
            (d for d in root.iterdir() if d.is_dir() and (d / traces_name).exists()),
            key=lambda d: (d.name != "cord", d.name),
        )
    if not folders:
        raise RunDirError(
            f"no {traces_name} in {root} nor in any folder under it: give the --out folder "
            "of `cord-coord run` or of `cord-coord eval`"
        )
    runs = []
    for folder in folders:
        traces = read_jsonl(folder / traces_name)
        failed = read_jsonl(folder / failed_name)
        names = {str(r.get("strategy")) for r in (*traces, *failed) if r.get("strategy")}
        strategy = names.pop() if len(names) == 1 else folder.name
        for row in traces:
            add_verdict(row, match)
        runs.append(StrategyRun(strategy, folder, traces, failed, (traces_name, failed_name)))
    if not any(run.traces for run in runs):
        failures = sum(len(run.failed) for run in runs)
        raise RunDirError(
            f"{root}: the {traces_name} files hold no traces"
            + (f" ({failures} problem(s) failed: see {failed_name})" if failures else "")
        )
    return RunDir(root, runs)


def add_verdict(row: dict[str, Any], match: MatchMethod | None = None) -> None:
    """Set ``correct`` / ``correct_by`` on a trace row that lacks them, or on every row
    when `match` names a method to judge by again."""
    if match is None and isinstance(row.get("correct"), bool):
        row.setdefault("correct_by", None)
        return
    verdict = judge(
        str(row.get("final_answer") or ""), str(row["reference_answer"]), match or "math"
    )
    row["correct"] = bool(verdict.correct)
    row["correct_by"] = verdict.by
