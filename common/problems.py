"""Input problems: JSONL, one object per line.

Fields: ``question`` (alias ``problem``), ``answer`` (the reference; the score needs it),
optional ``id`` (default: a digest of the question); every other field is carried through
to the output row under ``meta``. The whole file is checked before anything is enqueued;
each bad line yields a `LineError` naming the line, the field, what is wrong and the fix.

The rules live in `check_line` (one line) and `scan` (a stream of lines: blank lines,
UTF-8, the truncated last line, the empty file). Both hold one line at a time, so
`cord.coordinator.intake` checks a file of any size in bounded memory; `read_problems`
is the same check with every problem kept (and duplicate ids found with a dict), for
callers that want the problems as a list (`cord-coord eval`, tests).

A valid line becomes a `Checked`: the problem's fields and its stored form, the bytes
`Problem.model_dump_json()` gives, made without building the model (a fifth of the cost
of building and dumping it, a second per million lines). A line whose text cannot be stored
(a ``\\ud800``-style escape with no pair: no UTF-8 encodes it) is a bad line too: before,
it passed the check and crashed the enqueue halfway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pydantic_core
from pydantic import BaseModel, ConfigDict


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = {}


@dataclass(frozen=True)
class LineError:
    line: int
    field: str | None
    problem: str
    fix: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field `{self.field}`" if self.field else "")
        return f"{where}: {self.problem}; {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "error": self.problem, "fix": self.fix}


# What Problem.model_dump_json writes for NaN and infinities found in `meta` (`null`,
# pydantic's default), so `Checked.stored` stays byte-identical to it.
_INF_NAN = Problem.model_config.get("ser_json_inf_nan", "null")
_RESERVED = frozenset({"id", "question", "problem", "answer"})


class Checked(NamedTuple):
    """A valid line: the problem's fields and `stored`, what `Store` keeps for it. (A
    tuple: a frozen dataclass costs a second per million lines to build.)"""

    line: int
    id: str
    question: str
    answer: str
    meta: dict[str, Any]
    stored: bytes  # == Problem(...).model_dump_json().encode()

    def problem(self) -> Problem:
        return Problem(id=self.id, question=self.question, answer=self.answer, meta=self.meta)


def default_id(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def _text_field(
    obj: dict[str, Any], names: tuple[str, ...], line: int
) -> tuple[str | None, LineError | None]:
    field = next((n for n in names if n in obj), None)
    if field is None:
        shown = " (or `" + "`/`".join(names[1:]) + "`)" if len(names) > 1 else ""
        return None, LineError(line, names[0], "missing", f"add a `{names[0]}`{shown} string")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        kind = type(value).__name__ if value is not None else "null"
        return None, LineError(
            line, field, f"must be a string, got {kind}", f"write `{field}` as a JSON string"
        )
    text = value if isinstance(value, str) else json.dumps(value)
    if not text.strip():
        return None, LineError(line, field, "is empty", f"give `{field}` a non-empty value")
    return text, None


def _surrogate_error(obj: dict[str, Any], line: int) -> LineError:
    """A line whose text has a \\uD800-\\uDFFF escape without its pair: valid JSON, but
    no UTF-8 encodes it (once, such a line passed and the enqueue crashed halfway)."""
    field = None
    for name, value in obj.items():
        try:
            json.dumps([name, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            field = str(name)
            break
    return LineError(
        line,
        field,
        "has a \\uD800-\\uDFFF escape without its pair (no UTF-8 text can hold it)",
        "fix or remove that \\u escape",
    )


def check_line(raw: str, line: int) -> Checked | LineError:
    """One line's rules: a JSON object with a usable question, answer and id."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return LineError(
            line,
            None,
            f"not valid JSON ({e.msg} at column {e.colno})",
            "write one JSON object per line",
        )
    if not isinstance(obj, dict):
        return LineError(
            line,
            None,
            f"a JSON {type(obj).__name__} is not an object",
            'write one object per line, e.g. {"question": ..., "answer": ...}',
        )
    if "question" in obj and "problem" in obj:
        return LineError(
            line, "problem", "both `question` and its alias `problem` are set", "keep one of them"
        )
    # The common case (both plain non-blank strings) skips `_text_field`'s general path;
    # anything else goes through it, so the rules and messages are the same.
    question = obj.get("question", obj.get("problem"))
    if type(question) is not str or not question.strip():
        question, err = _text_field(obj, ("question", "problem"), line)
        if err:
            return err
    answer = obj.get("answer")
    if type(answer) is not str or not answer.strip():
        answer, err = _text_field(obj, ("answer",), line)
        if err:
            return err
    assert question is not None and answer is not None
    pid: str
    if "id" in obj:
        raw_id = obj["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not str(raw_id).strip():
            return LineError(
                line,
                "id",
                "must be a non-empty string or integer",
                "fix the `id` or drop it to use a digest of the question",
            )
        pid = str(raw_id).strip()
    else:
        try:
            pid = default_id(question)
        except UnicodeEncodeError:
            return _surrogate_error(obj, line)
    # Most files carry no extra fields: skip building `meta` key by key then.
    extra = len(obj) - 2 - ("id" in obj)
    meta = {k: v for k, v in obj.items() if k not in _RESERVED} if extra else {}
    answer = answer.strip()
    try:
        stored = pydantic_core.to_json(
            {"id": pid, "question": question, "answer": answer, "meta": meta},
            inf_nan_mode=_INF_NAN,
        )
    except pydantic_core.PydanticSerializationError:
        return _surrogate_error(obj, line)
    return Checked(line, pid, question, answer, meta, stored)


def parse_line(raw: str, line: int) -> tuple[Problem | None, LineError | None]:
    result = check_line(raw, line)
    if isinstance(result, LineError):
        return None, result
    return result.problem(), None


def scan(lines: Iterable[bytes]) -> Iterator[tuple[bytes, Checked | LineError]]:
    """Check a JSONL file's lines as read in binary (``for raw in open(path, "rb")``),
    one at a time: each non-blank line with its result (the line without its newline,
    for a rejects file). Duplicate ids are the caller's to find: the ids seen so far
    are the one thing that grows with the file. An empty file yields one error, line 0."""
    seen_any = False
    for index, raw_line in enumerate(lines, start=1):
        # Only the file's last line can lack the newline (`split(b"\n")`'s last piece).
        last = not raw_line.endswith(b"\n")
        raw_bytes = raw_line if last else raw_line[:-1]
        if not raw_bytes.strip():
            continue
        seen_any = True
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (
                raw_bytes,
                LineError(
                    index, None, f"invalid UTF-8 (byte {e.start + 1})", "save the file as UTF-8"
                ),
            )
            continue
        result = check_line(raw, index)
        if last and isinstance(result, LineError) and result.problem.startswith("not valid JSON"):
            result = LineError(
                index,
                None,
                "truncated last line (no newline, not valid JSON)",
                "complete the line or delete it",
            )
        yield raw_bytes, result
    if not seen_any:
        yield b"", LineError(0, None, "the file is empty", "give one JSON object per line")


def duplicate(line: int, pid: str, first: int) -> LineError:
    """A valid line whose id an earlier valid line (`first`) already has."""
    return LineError(
        line,
        "id",
        f"duplicate id {pid!r} (first on line {first})",
        "give each problem its own id",
    )


def read_problems(path: str | Path) -> tuple[list[Problem], list[LineError]]:
    """Parse and check a whole JSONL file: the valid problems and every bad line. Holds
    them all in memory; `cord.coordinator.intake` enqueues a file of any size without."""
    problems: list[Problem] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for _raw, result in scan(f):
            if isinstance(result, LineError):
                errors.append(result)
            elif result.id in seen:
                errors.append(duplicate(result.line, result.id, seen[result.id]))
            else:
                seen[result.id] = result.line
                problems.append(result.problem())
    return problems, errors
