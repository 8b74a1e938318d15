"""JSONL output: ``<dir>/traces.jsonl`` and ``<dir>/failed.jsonl``, a `TraceRow` or a
`FailureRow` (`cord.coordinator.rows`) per line; both are made with the first row.

Each row is appended whole (one write, flushed and fsynced) under an exclusive lock of
the traces file, so two coordinators sharing a folder never interleave. A torn last line
(power loss mid-write) is cut off on open.

The rows on disk are the record of what is finished; Redis's done marks follow them. The
writer keeps an index of the ids in both files, read on from where it last stopped (each
row is parsed once), and `write_once` looks at the rows added since, under the same lock,
before it appends: a problem whose row is there, written by this coordinator or another
on the same folder, is never written again, whatever Redis says after a failover lost a
done mark.
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
        self.index = RowIndex(self.traces, self.failed)

    def _open(self) -> None:
        """The folder and both files, made with the first row (a run with nothing to do
        leaves no folder; a run with rows always has both files, empty or not)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (self.traces, self.failed):
            path.touch(exist_ok=True)
        self._opened = True

    def write_once(self, row: TraceRow | FailureRow) -> bool:
        """Append `row` unless a row of its id is already in either file; True when
        written."""
        if not self._opened:
            self._open()
        data = row.model_dump_json().encode("utf-8") + b"\n"
        target = self.failed if isinstance(row, FailureRow) else self.traces
        with open(self.traces, "ab") as lock:  # the folder's one lock: both files
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.index.refresh()
                if self.index.kind(row.id) is not None:
                    return False
                with open(target, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def written(self, pid: str) -> bool | None:
        """Whether `pid` has a row on disk: None when not, else True for a failure
        record and False for a trace (the rows others wrote since, read first)."""
        self.index.refresh()
        return self.index.kind(pid)

    def written_ids(self) -> tuple[set[str], set[str]]:
        """The ids of the traces and of the failure records on disk now."""
        self.index.refresh()
        return self.index.ids(False), self.index.ids(True)


class RowIndex:
    """The ids of the rows in a traces file and a failure file, read incrementally: each
    `refresh` parses only the whole lines appended since the last one."""

    def __init__(self, traces: Path, failed: Path) -> None:
        self._files = {False: traces, True: failed}
        self._offsets = {False: 0, True: 0}
        self._kind: dict[str, bool] = {}  # id -> is a failure record

    def refresh(self) -> None:
        """Read the rows added since the last call."""
        for failed, path in self._files.items():
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self._offsets[failed])
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            for line in data[:end].splitlines():
                if line.strip():
                    self._kind.setdefault(RowId.model_validate_json(line).id, failed)
            self._offsets[failed] += end

    def kind(self, pid: str) -> bool | None:
        return self._kind.get(pid)

    def ids(self, failed: bool) -> set[str]:
        return {pid for pid, f in self._kind.items() if f == failed}


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
