"""Answers as math datasets write them: the one place that knows those formats.

- GSM8K: a worked solution whose last line is ``#### 72``; the answer is the text after
  the last ``####`` (`after_hashes`).
- MATH, NuminaMath, OpenR1-Math's solutions and most LRMs' final answers: the content of
  the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included (`last_boxed`).

`extract(text, how)` is what `--answer-from field|gsm8k|boxed` does to a reference answer
on the way in; `cord.coordinator.matching` uses `last_boxed` for the answer a trace states.
"""

from __future__ import annotations

import re
from typing import get_args

from cord.common.config import AnswerFrom

ANSWER_FROM: tuple[AnswerFrom, ...] = get_args(AnswerFrom)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_NUMBER_NOISE = str.maketrans("", "", ",$")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in `text`, nested braces included (``\\{``
    and ``\\}`` are literal braces, not nesting); None when there is none, or when its
    braces never close (a cut-off answer states nothing)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        i = start
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    inner = text[start:i].strip()
                    if inner:
                        return inner
                    break
            i += 1
    return None


def after_hashes(text: str) -> str | None:
    """GSM8K's reference: the text after the last ``####``, thousands separators and a
    dollar sign dropped (``#### 1,200`` -> ``1200``); None when there is no ``####`` or
    nothing after it."""
    _, sep, tail = text.rpartition("####")
    if not sep:
        return None
    answer = tail.strip().translate(_GSM8K_NUMBER_NOISE).strip()
    return answer or None


def extract(text: str, how: AnswerFrom) -> str | None:
    """The reference answer in `text` as `how` finds it; None when it is not there."""
    if how == "gsm8k":
        return after_hashes(text)
    if how == "boxed":
        return last_boxed(text)
    stripped = text.strip()
    return stripped or None


def where_missing(how: AnswerFrom) -> tuple[str, str]:
    """What is wrong with a text `extract` found nothing in, and the fix (a bad row's
    message)."""
    if how == "gsm8k":
        return (
            "has no `#### <answer>` line (--answer-from gsm8k)",
            "end the text with `#### <answer>`, or choose another --answer-from",
        )
    if how == "boxed":
        return (
            "has no complete `\\boxed{...}` (--answer-from boxed)",
            "put the answer in `\\boxed{...}`, or choose another --answer-from",
        )
    return ("is empty", "give it a non-empty value")
