"""Whether a final answer matches a reference answer: the one place that decides.

Two methods (the run config's ``eval.match``):

- ``math`` (default): HF's `math-verify` parses both and compares them as mathematics,
  so ``\\frac{1}{2}`` matches ``0.5`` and ``x = 3`` matches ``3``. Where it finds nothing
  to compare in the reference or in the answer, exact matching decides instead (the
  verdict says ``exact-fallback``).
- ``exact``: the answer the trace states (`stated_answer`), or its whole final answer,
  normalized, equals the reference, normalized (`normalize`). Never a substring test.

`judge` returns a `Verdict`: whether it matched and how that was decided, which every
trace row records (``correct``, ``correct_by``); `rundir` judges rows of older runs,
written without one, the same way.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

from cord.coordinator.inputs.answers import last_boxed

MatchMethod = Literal["math", "exact"]
MATCH_METHODS: tuple[MatchMethod, ...] = ("math", "exact")

# math-verify's own time limits (seconds, per parse and per comparison). They work by
# signal.alarm, so only in the main thread; elsewhere they are off (`_timeouts`).
PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5

_NUMBER = re.compile(r"-?\d+")
_FINAL_NUMBER = re.compile(r"final answer is\s*(-?\d+)")
_FINAL_IS = re.compile(r"final answer is\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")
# A reference in words ("yes", "Paris", "no solution"): letters, spaces and punctuation
# only, with a word of two letters or more. math-verify would read it as a product of
# one-letter symbols (y*e*s), which any anagram matches.
_WORD_CHARS = frozenset(" \t\n.,;:!?'\"()-")
_TWO_LETTERS = re.compile(r"[^\W\d_]{2}")


@dataclass(frozen=True)
class Verdict:
    """`correct`: the answer matches the reference; `by`: how that was decided,
    ``math-verify``, ``exact``, or ``exact-fallback`` (math was asked but math-verify
    found nothing to compare in the reference or in the answer)."""

    correct: bool
    by: str


def judge(final_answer: str, reference: str, method: MatchMethod = "math") -> Verdict:
    """Whether `final_answer` (a trace's text after ``</think>``) states `reference`.

    ``math``: math-verify parses the reference (LaTeX, as in ``$...$``) and the whole
    final answer (it finds ``\\boxed{}``, "final answer is", the last expression;
    several boxes make one set, where `stated_answer` takes the last) and compares them.
    Where either parse is empty, or the reference is plain words (math-verify would read
    "yes" as the product y*e*s), exact matching decides: ``by="exact-fallback"``.

    Errors and timeouts (5 s per parse and per comparison, in the main thread only: off
    it math-verify's signal.alarm cannot work, so there is no limit): math-verify treats
    a parse that fails or times out as nothing extracted (-> exact-fallback) and a
    comparison that fails or times out as unequal (-> wrong, ``by="math-verify"``); any
    exception that still escapes it is caught here and counts as nothing extracted
    (-> exact-fallback). Nothing math-verify raises leaves `judge`; an unknown `method`
    is a ValueError.

    ``exact``: `normalize(reference)` equals `normalize` of `stated_answer(final_answer)`
    or of the whole final answer.
    """
    if method == "exact":
        return Verdict(_exact(final_answer, reference), "exact")
    if method != "math":
        raise ValueError(f"unknown match method {method!r}; use one of {', '.join(MATCH_METHODS)}")
    decided = _math(final_answer, reference)
    if decided is None:
        return Verdict(_exact(final_answer, reference), "exact-fallback")
    return Verdict(decided, "math-verify")


def stated_answer(final_answer: str) -> str | None:
    """The answer a final answer states: the content of its last ``\\boxed{...}``; else
    what follows its last "final answer is" (to the end of that sentence, surrounding
    ``$`` and the closing period dropped: "The final answer is 46." -> "46"); else its
    last integer (`stated_number`); else None."""
    boxed = last_boxed(final_answer)
    if boxed is not None:
        return boxed
    found = list(_FINAL_IS.finditer(final_answer))
    if found:
        tail = found[-1].group(1)
        end = _SENTENCE_END.search(tail)
        said = _trim(tail[: end.start()] if end else tail)
        if said:
            return said
    return stated_number(final_answer)


def stated_number(text: str) -> str | None:
    """The integer a text states: the one after "final answer is" ("The final answer is
    23." -> "23"), else its last one; None when it has none."""
    match = _FINAL_NUMBER.search(text)
    if match:
        return match.group(1)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """An answer as exact matching compares it: surrounding space and ``$`` and a
    closing period dropped, runs of whitespace one space, case folded, thousands
    separators of a plain number dropped (``1,200`` -> ``1200``)."""
    text = _SPACE.sub(" ", _trim(answer)).casefold()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def _trim(text: str) -> str:
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("$").strip().removesuffix(".")
    return text


def _exact(final_answer: str, reference: str) -> bool:
    ref = normalize(reference)
    stated = stated_answer(final_answer)
    # A final answer that is the reference and nothing else also matches: `stated_answer`
    # takes the last number of "x^2+1" (1).
    return normalize(final_answer) == ref or (stated is not None and normalize(stated) == ref)


def _in_words(reference: str) -> bool:
    ref = reference.strip()
    plain = all(c.isalpha() or c in _WORD_CHARS for c in ref)
    return plain and bool(_TWO_LETTERS.search(ref))


def _math(final_answer: str, reference: str) -> bool | None:
    """math-verify's verdict, or None where it found nothing to compare (or raised)."""
    if _in_words(reference):
        return None
    mv = _math_verify()
    parse_s, verify_s = _timeouts()
    try:
        gold = _parse_reference(mv, reference, parse_s)
        if not gold:
            return None
        pred = mv.parse(final_answer, parsing_timeout=parse_s)
        if not pred:
            return None
        return bool(mv.verify(gold, pred, timeout_seconds=verify_s))
    except (Exception, mv.errors.TimeoutException):
        # TimeoutException derives from BaseException; KeyboardInterrupt still escapes.
        return None


def _parse_reference(mv: Any, reference: str, timeout_s: int | None) -> list[Any]:
    """A reference is an answer, not a text: LaTeX in math mode (``$...$``) unless it
    brings its own delimiters or ``\\boxed{}``. Plain parsing would take ``3x`` as 3 and
    ``2, 3`` as 3; it is the fallback where the LaTeX reading finds nothing."""
    ref = reference.strip()
    if "$" in ref or "\\boxed" in ref:
        parsed: list[Any] = mv.parse(ref, parsing_timeout=timeout_s)
        return parsed
    parsed = mv.parse(f"${ref}$", parsing_timeout=timeout_s)
    return parsed or mv.parse(ref, parsing_timeout=timeout_s)


def _timeouts() -> tuple[int | None, int | None]:
    """math-verify's limits where its signal.alarm works (the main thread); None (no
    limit) elsewhere, where it would raise instead."""
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; off is deliberate off the main
    thread (`_timeouts`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@functools.cache
def _math_verify() -> Any:
    """math-verify, imported on first use: with sympy it takes about a second, which
    commands that never judge an answer need not pay."""
    import math_verify
    import math_verify.errors

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarning())
    return math_verify
