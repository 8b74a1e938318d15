"""Enqueueing a problems source: check every record first, enqueue nothing on any error
unless asked to skip bad ones (then they go, with reasons, to a rejects file).

In bounded memory at any size (a 1M-problem file once took 1.1 GB to enqueue,
holding every line and every `Problem`), in two passes over temporary files:

1. Check: stream the source's records through `cord.coordinator.inputs.sources` (a JSONL file
   in binary, for exact line numbers and UTF-8 errors, through
   `cord.coordinator.inputs.problems.scan`; CSV, Parquet, Arrow datasets a batch at a time), a
   chunk of records at a time. Duplicate ids are found with
   an index on disk: SQLite (stdlib) with the id as primary key and the line of its first
   valid occurrence, the one structure that grows with the file, in a temporary folder
   with a bounded page cache. A sorted run of hashes would be smaller, but a duplicate's
   message names its first line, and a B-tree answers that as it inserts. Each valid,
   first-seen problem is spooled as its id and stored JSON (`Checked.stored`), so pass 2
   parses nothing. The first `ERRORS_KEPT` errors are kept for the report; all of them
   go, as found, to the rejects file (with --skip-invalid).
2. Enqueue (only when pass 1 found no error, or bad lines are skipped): stream the spool
   into Redis with `Store.enqueue_stored` (HSETNX of the JSON by id, and an RPUSH of
   each new id, in file order), `ENQUEUE_CHUNK` problems per call: what `Store.enqueue`
   stores, without building a `Problem` per line to serialize it again.

The temporary folder (`tempfile`'s, so TMPDIR moves it) holds about the file's size
again while it runs and is removed at the end.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from cord.common.config import InputSpec, RunConfig
from cord.common.keys import Keys
from cord.common.redisconn import connect, replicas_of
from cord.coordinator.inputs.problems import Checked, LineError, duplicate
from cord.coordinator.inputs.sources import Result, Source, open_source, raw_bytes
from cord.coordinator.store import Store

ERRORS_KEPT = 50  # errors the report holds (and the CLI prints); all are counted
CHUNK_LINES = 10_000  # lines checked against the id index at a time
CHUNK_BYTES = 8 << 20  # ... or fewer, when the lines are long
REPLICA_WAIT_MS = 10_000  # how long enqueue waits for a replica to confirm the problems
ENQUEUE_CHUNK = 500  # problems per call of the enqueue script (Store.enqueue's chunk)
SQLITE_CACHE_KIB = 32 << 10  # the id index's page cache; the rest stays on disk
_HEADER = struct.Struct("<II")  # spool record: len(id), len(json), id, json


@dataclass
class EnqueueReport:
    valid: int = 0
    added: int = 0
    errors: list[LineError] = field(default_factory=list)  # the first ERRORS_KEPT
    rejects_path: Path | None = None
    error_count: int = 0  # all bad records
    source: str = ""  # what was read (`Source.describe`)
    unit: str = "line"  # what an error names: JSONL lines, other sources' rows
    replicas: int = 0  # replicas connected to the primary when the problems went in
    replicated: int = 0  # of those, how many confirmed them (WAIT)

    @property
    def known(self) -> int:
        return self.valid - self.added


class _Check:
    """Pass 1: lines in, chunk by chunk; valid problems out to the spool, errors to the
    report and the rejects file."""

    def __init__(
        self,
        workdir: Path,
        report: EnqueueReport,
        spool: IO[bytes],
        rejects: Path | None,
        id_error: tuple[str, str] = ("id", "line"),
    ) -> None:
        self.report = report
        self.id_error = id_error  # a duplicate's (field, unit)
        self.spool: IO[bytes] | None = spool
        self.rejects_path = rejects  # --skip-invalid: opened at the first error
        self.rejects: IO[str] | None = None
        # Nothing needs to survive a crash: no journal, no fsync. One transaction for
        # the whole pass.
        self.db = sqlite3.connect(workdir / "ids.sqlite", isolation_level=None)
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            "locking_mode = EXCLUSIVE",
            f"cache_size = -{SQLITE_CACHE_KIB}",
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute(
            "CREATE TABLE seen (id TEXT PRIMARY KEY, line INTEGER NOT NULL) WITHOUT ROWID"
        )
        self.db.execute("BEGIN")
        self.valid: list[tuple[Any, Checked]] = []  # (source form, result): `Result`
        self.bad: list[tuple[Any, LineError]] = []
        self.size = 0

    def run(self, results: Iterable[Result]) -> None:
        try:
            for raw, result in results:
                if isinstance(result, LineError):
                    self.bad.append((raw, result))
                    self.size += len(raw) if isinstance(raw, bytes) else 0
                else:
                    self.valid.append((raw, result))
                    self.size += len(result.stored)
                if len(self.valid) + len(self.bad) >= CHUNK_LINES or self.size >= CHUNK_BYTES:
                    self._flush()
            self._flush()
        finally:
            self.db.close()
            if self.rejects is not None:
                self.rejects.close()

    def _flush(self) -> None:
        # The first valid line of each id: this chunk's, unless the index has an earlier.
        first: dict[str, int] = {}
        for _, c in self.valid:
            first.setdefault(c.id, c.line)
        before = self.db.total_changes
        self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", first.items())
        if self.db.total_changes - before < len(first):  # some were seen in earlier chunks
            query = "SELECT line FROM seen WHERE id = ?"
            for pid in first:
                first[pid] = self.db.execute(query, (pid,)).fetchone()[0]
        records: list[bytes] = []
        for raw, c in self.valid:
            if first[c.id] != c.line:
                self.bad.append((raw, duplicate(c.line, c.id, first[c.id], *self.id_error)))
                continue
            self.report.valid += 1
            if self.spool is not None:
                pid = c.id.encode("utf-8")
                records += (_HEADER.pack(len(pid), len(c.stored)), pid, c.stored)
        if self.bad and self.rejects_path is None:
            self.spool = None  # nothing will be enqueued: stop spooling, keep checking
        if self.spool is not None and records:
            self.spool.write(b"".join(records))
        for raw, err in sorted(self.bad, key=lambda b: b[1].line):
            self._error(raw, err)
        self.valid, self.bad, self.size = [], [], 0

    def _error(self, raw: Any, err: LineError) -> None:
        report = self.report
        report.error_count += 1
        if len(report.errors) < ERRORS_KEPT:
            report.errors.append(err)
        if self.rejects_path is not None:
            if self.rejects is None:
                self.rejects = open(self.rejects_path, "w", encoding="utf-8")  # noqa: SIM115
            row = {**err.to_json(), "raw": raw_bytes(raw).decode("utf-8", "replace")}
            self.rejects.write(json.dumps(row, ensure_ascii=False) + "\n")


def _spooled(spool: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Pass 1's (id, stored JSON) records, in file order."""
    header = _HEADER.size
    while head := spool.read(header):
        id_len, json_len = _HEADER.unpack(head)
        yield spool.read(id_len), spool.read(json_len)


def enqueue_file(
    cfg: RunConfig,
    path: str | Path,
    skip_invalid: bool = False,
    rejects: str | Path | None = None,
    spec: InputSpec | None = None,
) -> EnqueueReport:
    """Check every record of `path` (a file, a dataset folder or a Hub name; fields and
    split as `spec` says, default `cfg.input`), then (no bad record, or `skip_invalid`)
    enqueue the valid problems into `cfg`'s namespace; `rejects` (with `skip_invalid`,
    default ``<path>.rejected.jsonl``) gets each bad record with its line or row, field,
    error and fix. Raises `SourceError` when the source cannot be read at all."""
    source = open_source(path, spec or cfg.input)
    return enqueue_source(cfg, source, skip_invalid, rejects)


def enqueue_source(
    cfg: RunConfig, source: Source, skip_invalid: bool = False, rejects: str | Path | None = None
) -> EnqueueReport:
    report = EnqueueReport(source=source.describe(), unit=source.unit)
    keys = Keys(cfg.namespace)
    with tempfile.TemporaryDirectory(prefix="cord-enqueue-") as tmp:
        workdir = Path(tmp)
        spool_path = workdir / "spool"
        rejects_path = Path(rejects or source.rejects_path()) if skip_invalid else None
        with open(spool_path, "wb") as spool:
            _Check(workdir, report, spool, rejects_path, source.id_error).run(source.scan())
        if report.error_count:
            if not skip_invalid:
                return report
            report.rejects_path = rejects_path
        client = connect(cfg.redis_url)
        try:
            with open(spool_path, "rb") as spool:
                report.added = Store(client, keys).enqueue_stored(_spooled(spool), ENQUEUE_CHUNK)
            report.replicas, report.replicated = replicate(client)
        finally:
            client.close()
    return report


def replicate(client: redis.Redis) -> tuple[int, int]:
    """Wait until the primary's replicas hold every write of `client` so far (Redis's
    WAIT): the problems, the one write cord cannot rebuild if a failover loses it. Returns
    (replicas connected, replicas that confirmed); (0, 0) with no replica, or where the
    server refuses INFO or WAIT (some managed services)."""
    try:
        replicas = replicas_of(client)
        return (replicas, int(client.wait(replicas, REPLICA_WAIT_MS))) if replicas else (0, 0)
    except redis.ResponseError:
        return 0, 0
