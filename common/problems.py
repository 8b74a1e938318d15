"""Input problems: JSONL, one object per line.

Fields: ``question`` (alias ``problem``), ``answer`` (the reference; the score needs it),
optional ``id`` (default: a digest of the question); every other field is carried through
to the output row under ``meta``. The whole file is checked before anything is enqueued;
each bad line yields a `LineError` naming the line, the field, what is wrong and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def default_id(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]


def _text_field(
    obj: dict[str, Any], names: tuple[str, ...], line: int
) -> tuple[str | None, LineError | None]:
    field = next((n for n in names if n in obj), None)
    shown = " (or `" + "`/`".join(names[1:]) + "`)" if len(names) > 1 else ""
    if field is None:
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


def parse_line(raw: str, line: int) -> tuple[Problem | None, LineError | None]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, LineError(
            line,
            None,
            f"not valid JSON ({e.msg} at column {e.colno})",
            "write one JSON object per line",
        )
    if not isinstance(obj, dict):
        return None, LineError(
            line,
            None,
            f"a JSON {type(obj).__name__} is not an object",
            'write one object per line, e.g. {"question": ..., "answer": ...}',
        )
    if "question" in obj and "problem" in obj:
        return None, LineError(
            line, "problem", "both `question` and its alias `problem` are set", "keep one of them"
        )
    question, err = _text_field(obj, ("question", "problem"), line)
    if err:
        return None, err
    answer, err = _text_field(obj, ("answer",), line)
    if err:
        return None, err
    assert question is not None and answer is not None
    pid: str
    if "id" in obj:
        raw_id = obj["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not str(raw_id).strip():
            return None, LineError(
                line,
                "id",
                "must be a non-empty string or integer",
                "fix the `id` or drop it to use a digest of the question",
            )
        pid = str(raw_id).strip()
    else:
        pid = default_id(question)
    meta = {k: v for k, v in obj.items() if k not in {"id", "question", "problem", "answer"}}
    return Problem(id=pid, question=question, answer=answer.strip(), meta=meta), None


def read_problems(path: str | Path) -> tuple[list[Problem], list[LineError]]:
    """Parse and check a whole JSONL file: the valid problems and every bad line."""
    data = Path(path).read_bytes()
    if not data.strip():
        return [], [LineError(0, None, "the file is empty", "give one JSON object per line")]
    problems: list[Problem] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    lines = data.split(b"\n")
    last_index = len(lines) - 1
    for index, raw_bytes in enumerate(lines):
        line = index + 1
        if not raw_bytes.strip():
            continue
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(
                LineError(
                    line, None, f"invalid UTF-8 (byte {e.start + 1})", "save the file as UTF-8"
                )
            )
            continue
        problem, err = parse_line(raw, line)
        if (
            err is not None
            and index == last_index
            and isinstance(err.problem, str)
            and err.problem.startswith("not valid JSON")
        ):
            err = LineError(
                line,
                None,
                "truncated last line (no newline, not valid JSON)",
                "complete the line or delete it",
            )
        if err is not None:
            errors.append(err)
            continue
        assert problem is not None
        if problem.id in seen:
            errors.append(
                LineError(
                    line,
                    "id",
                    f"duplicate id {problem.id!r} (first on line {seen[problem.id]})",
                    "give each problem its own id",
                )
            )
            continue
        seen[problem.id] = line
        problems.append(problem)
    return problems, errors
