"""Where problems come from: a JSONL, JSON, CSV/TSV or Parquet file, a folder made by
`datasets.save_to_disk` (or any folder `datasets.load_dataset` reads), or a Hub dataset
name, all read record by record into `cord.coordinator.inputs.problems.check_record`.

`open_source(location, spec)` finds what `location` is and opens it; whatever is wrong
with the source as a whole (no such file, an unknown format, a split that is not there,
a field no record has, a Hub dataset neither reachable nor cached) is a `SourceError`
raised then, before anything is read, with the fix. `Source.scan()` then yields each
record's result as `cord.coordinator.inputs.problems.scan` does for JSONL lines: the record as bytes
(for a rejects file) and a `Checked` or a `LineError` naming its row.

Memory: JSONL, CSV, Parquet (a row group's batch at a time) and Arrow datasets (memory-
mapped, a batch at a time) are read in bounded memory at any size; a JSON file that is
one array is parsed whole (write JSONL for large sets).

Hub names: `datasets.load_dataset(name, subset, split=split)`. Without a network (the
Hub's host does not answer in `HUB_PROBE_S`), datasets' offline mode is switched on, so
it reads its local cache at once (instead of retrying for half a minute) and the error
says so when the dataset is not there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from cord.common.config import InputSpec
from cord.coordinator.inputs.problems import (
    DEFAULT_INPUT,
    Checked,
    LineError,
    Problem,
    check_record,
    duplicate,
    plan_of,
    scan,
)

Kind = Literal["jsonl", "json", "csv", "tsv", "parquet", "disk", "folder", "hub"]
BY_SUFFIX: dict[str, Kind] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
NAMES = {
    "jsonl": "JSON Lines",
    "json": "JSON",
    "csv": "CSV",
    "tsv": "TSV",
    "parquet": "Parquet",
    "disk": "datasets folder (save_to_disk)",
    "folder": "data folder (load_dataset)",
    "hub": "Hub dataset",
}
BATCH_ROWS = 1024  # rows per batch read from Parquet and Arrow
HUB_PROBE_S = 3.0
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A record's source form beside its result: a JSONL line's bytes, or the record itself
# (a CSV, Parquet or Arrow row), put into JSON only where a rejects file needs it
# (`raw_bytes`): doing so for every row cost a Parquet scan 60% more time.
Result = tuple[Any, Checked | LineError]


class SourceError(ValueError):
    """A source that cannot be read at all; the message says why and the fix."""


@dataclass
class Source:
    location: str
    kind: Kind
    spec: InputSpec
    dataset: Any = None  # a `datasets.Dataset` (disk, folder, hub)
    note: str = ""  # how it was found (the split chosen, the cache used)

    @property
    def unit(self) -> str:
        """What an error counts: lines of a JSONL file, rows of anything else."""
        return "line" if self.kind == "jsonl" else "row"

    @property
    def id_error(self) -> tuple[str, str]:
        """(field, unit) for a duplicate id's error."""
        return self.spec.id_field or "id", self.unit

    def describe(self) -> str:
        return f"{self.location} ({NAMES[self.kind]}{', ' + self.note if self.note else ''})"

    def rejects_path(self) -> Path:
        """Where --skip-invalid writes rejected records by default: beside a file or
        folder, in the working folder for a Hub name."""
        if self.kind == "hub":
            return Path(self.location.replace("/", "__") + ".rejected.jsonl")
        return Path(self.location.rstrip("/") + ".rejected.jsonl")

    def scan(self) -> Iterator[Result]:
        if self.kind == "jsonl":
            yield from _jsonl(Path(self.location), self.spec)
        elif self.kind == "json":
            yield from _json(Path(self.location), self.spec)
        elif self.kind in ("csv", "tsv"):
            yield from _csv(Path(self.location), self.spec, "\t" if self.kind == "tsv" else ",")
        elif self.kind == "parquet":
            yield from _records(_parquet_rows(Path(self.location)), self.spec, "dataset")
        else:
            yield from _records(_dataset_rows(self.dataset), self.spec, "dataset")


def open_source(location: str | Path, spec: InputSpec = DEFAULT_INPUT) -> Source:
    """What `location` is, opened; a `SourceError` when it cannot be read."""
    where = str(location)
    path = Path(where)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _arrow(where, "disk", spec)
        return _arrow(where, "folder", spec)
    if path.exists():
        kind = BY_SUFFIX.get(path.suffix.lower())
        if kind is None:
            raise SourceError(
                f"{where}: unknown format {path.suffix or '(no suffix)'!r}; name the file "
                f"{', '.join(sorted(BY_SUFFIX))}, or give a save_to_disk folder or a Hub name"
            )
        if kind == "parquet":
            _check_columns(where, _parquet_columns(path), spec)
        elif kind == "json" and _first_line_is_object(path):
            kind = "jsonl"  # `Dataset.to_json` writes JSON Lines under a .json name
        return Source(where, kind, spec)
    if _HUB_NAME.match(where) and not where.endswith(tuple(BY_SUFFIX)):
        return _arrow(where, "hub", spec)
    raise SourceError(f"{where}: no such file or folder (nor a Hub dataset name)")


# -- files -------------------------------------------------------------------------------
def _jsonl(path: Path, spec: InputSpec) -> Iterator[Result]:
    with open(path, "rb") as f:
        yield from scan(f, spec)


def _first_line_is_object(path: Path) -> bool:
    """A .json file whose first line is a whole JSON object holds JSON Lines, unless that
    object is the whole file's wrapper of rows (``{"data": [...]}`` on one line)."""
    with open(path, "rb") as f:
        first = f.readline().strip()
    if not first.startswith(b"{"):
        return False
    try:
        obj = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    wrapper = len(obj) == 1 and isinstance(next(iter(obj.values())), list)
    return isinstance(obj, dict) and not wrapper


def _json(path: Path, spec: InputSpec) -> Iterator[Result]:
    """A JSON array of objects, or an object with one list of them (``{"data": [...]}``)."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(
            f"{path}: not valid JSON ({e}); give one array of objects, or JSON Lines"
        ) from e
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise SourceError(
                f"{path}: a JSON object, but not one with a single list of rows "
                f"(lists under: {lists or 'none'}); give an array of objects"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise SourceError(f"{path}: a JSON {type(data).__name__}; give an array of objects")
    yield from _records(data, spec, "file")


def _csv(path: Path, spec: InputSpec, delimiter: str) -> Iterator[Result]:
    """Rows after the header, counted from 1; every value is text (a blank cell is an
    empty value). A BOM (spreadsheets write one) is dropped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames
            if header is None:
                yield b"", LineError(0, None, "the file is empty", "give a header row", "row")
                return
            _check_columns(str(path), list(header), spec)
            plan = plan_of(spec)
            rows = 0
            for rows, rec in enumerate(reader, start=1):
                if None in rec:
                    yield (
                        rec,
                        LineError(
                            rows,
                            None,
                            f"has more cells than the header's {len(header)}",
                            "quote cells that hold the delimiter, or fix the row",
                            "row",
                        ),
                    )
                elif any(v is None for v in rec.values()):
                    yield (
                        rec,
                        LineError(
                            rows,
                            None,
                            f"has fewer cells than the header's {len(header)}",
                            "fill the missing cells, or fix the row",
                            "row",
                        ),
                    )
                else:
                    yield rec, check_record(rec, rows, plan, "row")
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: invalid UTF-8 ({e.reason}); save the file as UTF-8") from e
        except csv.Error as e:
            raise SourceError(f"{path}: not readable as CSV ({e})") from e
    if rows == 0:
        yield b"", LineError(0, None, "the file has no rows", "give a row per problem", "row")


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as e:  # pyarrow's errors for a file that is not Parquet vary
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from e


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=BATCH_ROWS):
            yield from batch.to_pylist()


# -- datasets ----------------------------------------------------------------------------
def _arrow(where: str, kind: Kind, spec: InputSpec) -> Source:
    """A `datasets.Dataset` from a save_to_disk folder, a data folder or the Hub, one
    split of it, its columns checked."""
    import datasets

    note = ""
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(where)
        elif kind == "folder":
            loaded = datasets.load_dataset(where, spec.subset)
        else:
            loaded, note = _hub(where, spec)
    except SourceError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFound, Value, DataFiles...)
        raise SourceError(f"{where}: datasets could not load it ({type(e).__name__}: {e})") from e
    if isinstance(loaded, datasets.DatasetDict | dict):
        splits = list(loaded)
        if spec.split is not None:
            if spec.split not in loaded:
                raise SourceError(
                    f"{where}: no split {spec.split!r}; choose one of {splits} with --split"
                )
            loaded = loaded[spec.split]
            note = ", ".join(x for x in (note, f"split {spec.split}") if x)
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
            note = ", ".join(x for x in (note, f"split {splits[0]}") if x)
        else:
            raise SourceError(f"{where}: has splits {splits}; choose one with --split")
    elif spec.split is not None and kind == "disk":
        raise SourceError(f"{where}: a single dataset (no splits); leave --split out")
    _check_columns(where, list(loaded.column_names), spec)
    return Source(where, kind, spec, dataset=loaded, note=note)


def _hub(name: str, spec: InputSpec) -> tuple[Any, str]:
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE) or not _hub_answers()
    if offline:
        _go_offline()
    split = spec.split
    try:
        return datasets.load_dataset(name, spec.subset, split=split), (
            "from the local cache, offline" if offline else ""
        )
    except (ConnectionError, FileNotFoundError) as e:
        if not offline:
            raise
        cache = datasets.config.HF_DATASETS_CACHE
        raise SourceError(
            f"{name}: not in the local datasets cache ({cache}) and the Hub cannot be "
            f"reached ({type(e).__name__}); load it once where the Hub answers, with the "
            "same HF_HOME/HF_DATASETS_CACHE, or give a local file"
        ) from e


def _hub_answers() -> bool:
    """Whether the Hub's host takes a TCP connection within `HUB_PROBE_S`."""
    import huggingface_hub.constants as hub

    url = urlparse(hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), HUB_PROBE_S):
            return True
    except OSError:
        return False


def _go_offline() -> None:
    """datasets' and huggingface_hub's offline mode, for this process: their flags are
    read from the environment at import, so the modules' copies are set too."""
    import datasets
    import huggingface_hub.constants as hub

    os.environ["HF_HUB_OFFLINE"] = "1"
    hub.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def _dataset_rows(dataset: Any) -> Iterator[dict[str, Any]]:
    for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from table.to_pylist()


def write_records(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows to a file in the format its suffix names (`BY_SUFFIX`): what `open_source`
    reads back (the lab's `lab-problems --out`; tests)."""
    kind = BY_SUFFIX.get(path.suffix.lower())
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            names = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, names, delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise SourceError(f"{path}: unknown format; name it {', '.join(sorted(BY_SUFFIX))}")


# -- shared --------------------------------------------------------------------------------
def _check_columns(where: str, columns: list[str], spec: InputSpec) -> None:
    """A field the spec names that no row can have (the source has a schema): one error
    for the source, with its columns, instead of one per row."""
    have = set(columns)
    shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
    if spec.question_field is None:
        if not have & {"question", "problem"}:
            raise SourceError(
                f"{where}: no `question` (or `problem`) column (columns: {shown}); "
                "name the question's column with --question-field"
            )
    elif spec.question_field not in have:
        raise SourceError(
            f"{where}: no column `{spec.question_field}` for the question (columns: {shown}); "
            "fix --question-field"
        )
    if spec.answer_field not in have:
        raise SourceError(
            f"{where}: no column `{spec.answer_field}` for the answer (columns: {shown}); "
            "name it with --answer-field"
        )
    if spec.id_field is not None and spec.id_field not in have:
        raise SourceError(
            f"{where}: no column `{spec.id_field}` for the id (columns: {shown}); "
            "fix --id-field, or leave it out for digests of the questions"
        )


def _records(rows: Iterable[Any], spec: InputSpec, empty: str) -> Iterator[Result]:
    """Rows counted from 1 through `check_record`; an empty source is one error."""
    count = 0
    plan = plan_of(spec)
    for count, rec in enumerate(rows, start=1):
        if not isinstance(rec, dict):
            yield (
                rec,
                LineError(
                    count,
                    None,
                    f"a JSON {type(rec).__name__} is not an object",
                    'make each row an object, e.g. {"question": ..., "answer": ...}',
                    "row",
                ),
            )
            continue
        yield rec, check_record(rec, count, plan, "row")
    if count == 0:
        yield b"", LineError(0, None, f"the {empty} has no rows", "give a row per problem", "row")


def raw_bytes(raw: Any) -> bytes:
    """A `Result`'s source form as one line, for a rejects file: a JSONL line as it was,
    any other record as JSON (dates and bytes as text)."""
    if isinstance(raw, bytes):
        return raw
    buf = io.StringIO()
    json.dump(raw, buf, ensure_ascii=False, default=str)
    return buf.getvalue().encode("utf-8", "replace")


def read_problems(
    source: str | Path, spec: InputSpec = DEFAULT_INPUT
) -> tuple[list[Problem], list[LineError]]:
    """Read and check a whole source (any format `open_source` reads): the valid
    problems and every bad record. Holds them all in memory; `intake` enqueues a source
    of any size without. Raises `SourceError` when the source itself
    cannot be read."""
    problems: list[Problem] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    src = open_source(source, spec)
    for _raw, result in src.scan():
        if isinstance(result, LineError):
            errors.append(result)
        elif result.id in seen:
            errors.append(duplicate(result.line, result.id, seen[result.id], *src.id_error))
        else:
            seen[result.id] = result.line
            problems.append(result.problem())
    return problems, errors
