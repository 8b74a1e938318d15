"""Reading a finished run's rows back: the one reader behind `export`, `report`, `eval`,
the demo's summary, the chaos check and the benchmarks.

A run folder is either what `cord-coord run` writes (``traces.jsonl`` and
``failed.jsonl``, under the prefixes of ``output.traces_prefix`` / ``failed_prefix``) or
what `cord-coord eval` writes (one such folder per strategy). Each line is parsed once
into its model (`cord.coordinator.rows`); rows keep the verdict they were written with
(``correct``, ``correct_by``), and rows of older runs, written before verdicts were, are
judged here, the way a run judges them now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cord.coordinator.matching import MatchMethod, judge
from cord.coordinator.rows import FailureRow, TraceRow

R = TypeVar("R", bound=BaseModel)


class RunDirError(Exception):
    """The folder holds no rows to read, or a line that is not a row."""


@dataclass
class StrategyRun:
    """The rows of one strategy: a run folder, or one strategy's folder of an eval."""

    strategy: str
    folder: Path
    traces: list[TraceRow] = field(default_factory=list)
    failed: list[FailureRow] = field(default_factory=list)
    files: tuple[str, str] = ("traces.jsonl", "failed.jsonl")  # the names read in `folder`

    @property
    def problems(self) -> int:
        return len({r.id for r in (*self.traces, *self.failed)})


@dataclass
class RunDir:
    path: Path
    runs: list[StrategyRun]

    @property
    def traces(self) -> list[TraceRow]:
        return [row for run in self.runs for row in run.traces]

    @property
    def failed(self) -> list[FailureRow]:
        return [row for run in self.runs for row in run.failed]

    @property
    def strategies(self) -> list[str]:
        return [run.strategy for run in self.runs]


def read_rows(path: Path, model: type[R], bad: list[str] | None = None) -> list[R]:
    """Every row of a JSONL file as `model`. An unterminated last line that does not
    parse is a row still being written (a run in progress) and is left out; any other bad
    line is an error naming the file and line, or, given a `bad` list, is added to it
    (the chaos check counts such rows as invalid)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows: list[R] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(model.model_validate_json(line))
        except ValidationError as e:
            not_json = _json_error(line)
            if not_json and number == len(lines):  # no newline after it: still written
                break
            why = f"not JSON ({not_json})" if not_json else f"not a row ({_first(e)})"
            error = f"{path}:{number}: {why}"
            if bad is None:
                raise RunDirError(error) from e
            bad.append(error)
    return rows


def read_traces(path: Path, match: MatchMethod | None = None) -> list[TraceRow]:
    """The trace rows of `path`, each with its verdict (`add_verdict`)."""
    rows = read_rows(path, TraceRow)
    for row in rows:
        add_verdict(row, match)
    return rows


def read_failures(path: Path) -> list[FailureRow]:
    return read_rows(path, FailureRow)


def _json_error(line: str) -> str | None:
    """What is wrong with `line` as JSON; None when it is JSON."""
    try:
        json.loads(line)
    except json.JSONDecodeError as e:
        return e.msg
    return None


def _first(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    return f"{where}: {e['msg']}" if where else e["msg"]


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
        traces = read_traces(folder / traces_name, match)
        failed = read_failures(folder / failed_name)
        names = {r.strategy for r in (*traces, *failed) if r.strategy}
        strategy = names.pop() if len(names) == 1 else folder.name
        runs.append(StrategyRun(strategy, folder, traces, failed, (traces_name, failed_name)))
    if not any(run.traces for run in runs):
        failures = sum(len(run.failed) for run in runs)
        raise RunDirError(
            f"{root}: the {traces_name} files hold no traces"
            + (f" ({failures} problem(s) failed: see {failed_name})" if failures else "")
        )
    return RunDir(root, runs)


def add_verdict(row: TraceRow, match: MatchMethod | None = None) -> None:
    """Set ``correct`` / ``correct_by`` on a trace row that lacks them, or on every row
    when `match` names a method to judge by again."""
    if match is None and row.correct is not None:
        return
    verdict = judge(row.final_answer, row.reference_answer, match or "math")
    row.correct, row.correct_by = verdict.correct, verdict.by
