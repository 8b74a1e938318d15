"""JSONL output: ``<dir>/traces.jsonl`` and ``<dir>/failed.jsonl``, a `TraceRow` or a
`FailureRow` (`cord.coordinator.rows`) per line; both are made with the first row.

Each row is appended whole (one write, flushed and fsynced) under an exclusive file
lock, so two coordinators sharing a folder never interleave. A torn last line (power loss
mid-write) is cut off on open.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cord.coordinator.rows import FailureRow, RowId, TraceRow


class JsonlWriter:
    def __init__(
        self, out_dir: str | Path, traces_prefix: str = "traces", failed_prefix: str = "failed"
    ) -> None:
        self.dir = Path(out_dir)
        self.traces = self.dir / f"{traces_prefix}.jsonl"
        self.failed = self.dir / f"{failed_prefix}.jsonl"
        for path in (self.traces, self.failed):
            repair_torn_tail(path)
        self._opened = False

    def _open(self) -> None:
        """The folder and both files, made with the first row (a run with nothing to do
        leaves no folder; a run with rows always has both files, empty or not)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (self.traces, self.failed):
            path.touch(exist_ok=True)
        self._opened = True

    def write(self, row: TraceRow | FailureRow) -> None:
        if not self._opened:
            self._open()
        data = row.model_dump_json().encode("utf-8") + b"\n"
        with open(self.failed if isinstance(row, FailureRow) else self.traces, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def written_ids(self) -> tuple[set[str], set[str]]:
        return read_ids(self.traces), read_ids(self.failed)


def read_ids(path: Path) -> set[str]:
    """The ids of the rows in `path` (after `repair_torn_tail`: every line is whole)."""
    ids: set[str] = set()
    if not path.exists():
        return ids
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids.add(RowId.model_validate_json(line).id)
    return ids


def repair_torn_tail(path: Path) -> bool:
    """Cut an unterminated last line; True when something was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            data = f.read()
            if data.endswith(b"\n"):
                return False
            f.truncate(data.rfind(b"\n") + 1)
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
