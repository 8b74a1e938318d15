"""Input problems: one record (a JSON object, a CSV row, a Parquet or Arrow row) each.

Fields, by default: ``question`` (alias ``problem``), ``answer`` (the reference; the score
needs it), optional ``id`` (default: a digest of the question); `InputSpec` (the run
config's ``input:``, the ``--question-field``/``--answer-field``/``--id-field`` and
``--answer-from`` flags) names other fields and says how the reference is written
(`answers`). Question and answer must be text. Every other field is carried through to
the output row (`Problem.meta`). The whole source is checked before anything is
enqueued; each bad record yields a `LineError` naming the line (JSONL) or row (other
formats, counted from 1), the field, what is wrong and the fix.

The rules live in `check_record` (one record), `check_line` (one JSONL line) and `scan`
(a stream of JSONL lines: blank lines, UTF-8, the truncated last line, the empty file);
`sources` reads the other formats into `check_record`. All hold one record at a time, so
`intake` checks a source of any size in bounded memory; `sources.read_problems` is the
same check with every problem kept, for callers that want a list (`cord-coord eval`).

A valid line becomes a `Checked`: the problem's fields and its stored form, the bytes
`Problem.model_dump_json()` gives, made without building the model (a fifth of the cost
of building and dumping it, a second per million lines). A line whose text cannot be stored
(a ``\\ud800``-style escape with no pair: no UTF-8 encodes it) is a bad line too: before,
it passed the check and crashed the enqueue halfway.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

import pydantic_core
from pydantic import BaseModel, ConfigDict

from cord.common.config import AnswerFrom, InputSpec
from cord.coordinator.inputs.answers import extract, where_missing


class Problem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = {}


def plan_of(spec: InputSpec) -> Plan:
    """The spec as `check_record` reads it, once per source (a pydantic model's
    attributes cost a lookup a record; a tuple's do not)."""
    consumed = {spec.id_field or "id"}
    consumed |= {spec.question_field} if spec.question_field else {"question", "problem"}
    if spec.answer_from == "field":
        consumed.add(spec.answer_field)
    return Plan(
        spec.question_field,
        spec.answer_field,
        spec.answer_from,
        spec.id_field,
        frozenset(consumed),
        2 if spec.answer_from == "field" else 1,
        spec.answers_as_text,
    )


class Plan(NamedTuple):
    question_field: str | None
    answer_field: str
    answer_from: AnswerFrom
    id_field: str | None
    # The fields a record's problem is made of; the rest go to `meta`. A reference
    # extracted from a longer text (gsm8k/boxed: a worked solution) leaves it in `meta`.
    consumed: frozenset[str]
    always: int  # consumed fields every valid record has
    answers_as_text: bool = False  # a number in the answer field is taken as its text


DEFAULT_INPUT = InputSpec()
DEFAULT_PLAN = plan_of(DEFAULT_INPUT)


@dataclass(frozen=True)
class LineError:
    line: int
    field: str | None
    problem: str
    fix: str
    unit: str = "line"  # JSONL names lines; other formats name rows

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" + (f", field `{self.field}`" if self.field else "")
        return f"{where}: {self.problem}; {self.fix}"

    def to_json(self) -> dict[str, Any]:
        return {self.unit: self.line, "field": self.field, "error": self.problem, "fix": self.fix}


# What Problem.model_dump_json writes for NaN and infinities found in `meta` (`null`,
# pydantic's default), so `Checked.stored` stays byte-identical to it.
_INF_NAN = Problem.model_config.get("ser_json_inf_nan", "null")
_ABSENT = object()  # a record without the field


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
    obj: dict[str, Any], names: tuple[str, ...], line: int, unit: str, flag: str
) -> tuple[str | None, LineError | None]:
    """The text in the first of `names` that `obj` has, or what is wrong with it: missing,
    not text (a number too: `72` is refused, `"72"` is not), or blank."""
    field = next((n for n in names if n in obj), None)
    if field is None:
        shown = " (or `" + "`/`".join(names[1:]) + "`)" if len(names) > 1 else ""
        fix = f"add a `{names[0]}`{shown} string, or name the field that holds it with {flag}"
        return None, LineError(line, names[0], "missing", fix, unit)
    value = obj[field]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        example = f" (`{json.dumps(str(value))}`, not `{value}`)" if _is_number(value) else ""
        fix = f"write `{field}` as a string{example}"
        if _is_number(value) and flag == "--answer-field":
            fix += ", or pass --answers-as-text (input.answers_as_text) to take numbers as text"
        return None, LineError(line, field, f"must be text, got {kind}", fix, unit)
    if not value.strip():
        return None, LineError(line, field, "is empty", f"give `{field}` a non-empty value", unit)
    return value, None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_number(value: Any) -> TypeGuard[float]:
    return _is_number(value) and math.isfinite(value)


def number_text(value: float) -> str:
    """A finite number as a reference answer's text: `72` for 72 and for 72.0 (a float
    column of whole numbers, as pandas makes an integer column with nulls), `0.5` for
    0.5."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _surrogate_error(obj: dict[str, Any], line: int, unit: str = "line") -> LineError:
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
        unit,
    )


def check_line(raw: str, line: int, plan: Plan = DEFAULT_PLAN) -> Checked | LineError:
    """One JSONL line's rules: a JSON object that `check_record` accepts."""
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
    return check_record(obj, line, plan)


def check_record(
    obj: dict[str, Any], line: int, plan: Plan = DEFAULT_PLAN, unit: str = "line"
) -> Checked | LineError:
    """One record's rules: a usable question, reference answer and id, where `plan` (a
    `plan_of(spec)`) says they are; `line` (counted from 1) and `unit` name the
    record in an error.

    One function, longer than most, on purpose: it runs once per record, a million times
    for a million-problem enqueue, where each call saved is measurable (the common case,
    plain strings, takes the straight path through it)."""
    qfield = plan.question_field
    if qfield is None:
        if "question" in obj and "problem" in obj:
            return LineError(
                line,
                "problem",
                "both `question` and its alias `problem` are set",
                "keep one of them",
                unit,
            )
        question = obj.get("question", obj.get("problem"))
        qnames: tuple[str, ...] = ("question", "problem")
    else:
        question = obj.get(qfield)
        qnames = (qfield,)
    # The common case (plain non-blank strings) skips `_text_field`'s general path;
    # anything else goes through it, so the rules and messages are the same.
    if type(question) is not str or not question.strip():
        question, err = _text_field(obj, qnames, line, unit, "--question-field")
        if err:
            return err
    afield = plan.answer_field
    answer = obj.get(afield)
    if plan.answers_as_text and _finite_number(answer):
        answer = number_text(answer)  # NaN and infinities stay numbers, and are refused
    if type(answer) is not str or not answer.strip():
        answer, err = _text_field(obj, (afield,), line, unit, "--answer-field")
        if err:
            return err
    assert question is not None and answer is not None
    if plan.answer_from == "field":
        answer = answer.strip()
    else:
        extracted = extract(answer, plan.answer_from)
        if extracted is None:
            problem, fix = where_missing(plan.answer_from)
            return LineError(line, afield, problem, fix, unit)
        answer = extracted
    idfield = plan.id_field or "id"
    raw_id = obj.get(idfield, _ABSENT)
    pid = raw_id.strip() if type(raw_id) is str else ""
    if pid:
        pass  # the common case: a non-blank string
    elif raw_id is _ABSENT:
        if plan.id_field is not None:
            return LineError(
                line,
                idfield,
                "missing (the id field was named, so every record needs one)",
                f"give the record an `{idfield}`, or leave the id field unset for digests",
                unit,
            )
        try:
            pid = default_id(question)
        except UnicodeEncodeError:
            return _surrogate_error(obj, line, unit)
    elif type(raw_id) is int:
        pid = str(raw_id)
    else:
        return LineError(
            line,
            idfield,
            "must be a non-empty string or integer",
            f"fix the `{idfield}`"
            + (" or drop it to use a digest of the question" if plan.id_field is None else ""),
            unit,
        )
    # Most files carry no extra fields: skip building `meta` key by key then. (A question
    # and, unless the reference is extracted from it, an answer field are consumed.)
    extra = len(obj) - plan.always - (idfield in obj)
    meta = {k: v for k, v in obj.items() if k not in plan.consumed} if extra else {}
    try:
        stored = pydantic_core.to_json(
            {"id": pid, "question": question, "answer": answer, "meta": meta},
            inf_nan_mode=_INF_NAN,
        )
    except pydantic_core.PydanticSerializationError:
        return _surrogate_error(obj, line, unit)
    return Checked(line, pid, question, answer, meta, stored)


def parse_line(raw: str, line: int) -> tuple[Problem | None, LineError | None]:
    result = check_line(raw, line)
    if isinstance(result, LineError):
        return None, result
    return result.problem(), None


def scan(
    lines: Iterable[bytes], spec: InputSpec = DEFAULT_INPUT
) -> Iterator[tuple[bytes, Checked | LineError]]:
    """Check a JSONL file's lines as read in binary (``for raw in open(path, "rb")``),
    one at a time: each non-blank line with its result (the line without its newline,
    for a rejects file). Duplicate ids are the caller's to find: the ids seen so far
    are the one thing that grows with the file. An empty file yields one error, line 0."""
    seen_any = False
    plan = plan_of(spec)
    for index, raw_line in enumerate(lines, start=1):
        # Only the file's last line can lack the newline (`split(b"\n")`'s last piece).
        last = not raw_line.endswith(b"\n")
        raw_bytes = raw_line if last else raw_line[:-1]
        if not raw_bytes.strip():
            continue
        seen_any = True
        # Fast path: pydantic-core's parser (2.5x json.loads) on the bytes, which also
        # refuses invalid UTF-8, control characters and lone surrogates. Anything it
        # refuses, or a value that is not an object, takes the path below, which
        # names what is wrong as it always has.
        try:
            obj = pydantic_core.from_json(raw_bytes)
        except ValueError:
            obj = None
        if type(obj) is dict:
            yield raw_bytes, check_record(obj, index, plan)
            continue
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
        result = check_line(raw, index, plan)
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


def duplicate(line: int, pid: str, first: int, field: str = "id", unit: str = "line") -> LineError:
    """A valid record whose id an earlier valid record (`first`) already has."""
    return LineError(
        line,
        field,
        f"duplicate id {pid!r} (first on {unit} {first})",
        "give each problem its own id",
        unit,
    )
