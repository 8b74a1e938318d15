"""Answer matching with the real math-verify: math where it can parse both sides, exact
matching where it cannot, and never a substring test."""

import threading

import pytest

from cord.coordinator.matching import (
    Verdict,
    judge,
    normalize,
    stated_answer,
    stated_number,
)
from cord.lab.arith import final_answer_text


def test_a_fraction_equals_its_decimal_under_math_only():
    assert judge(r"\frac{1}{2}", "0.5") == Verdict(True, "math-verify")
    assert judge(r"The answer is $\boxed{\frac{1}{2}}$.", "0.5") == Verdict(True, "math-verify")
    assert judge(r"\frac{1}{2}", "0.5", "exact") == Verdict(False, "exact")


def test_an_equation_states_its_value():
    assert judge("x=3", "3") == Verdict(True, "math-verify")
    assert judge("The final answer is 3.", "x = 3") == Verdict(True, "math-verify")
    assert judge("x=4", "3") == Verdict(False, "math-verify")


@pytest.mark.parametrize("method", ["math", "exact"])
def test_the_labs_final_answer(method):
    said = final_answer_text("46")
    assert said == "The final answer is 46."
    assert stated_answer(said) == "46"
    by = "math-verify" if method == "math" else "exact"
    assert judge(said, "46", method) == Verdict(True, by)
    assert judge(said, "45", method) == Verdict(False, by)
    assert judge("The final answer is 230.", "23", method) == Verdict(False, by)


def test_a_boxed_answer_with_nested_braces():
    final = r"Adding them gives $\sqrt{8}$, so the answer is \boxed{\frac{\sqrt{8}}{2}}."
    assert stated_answer(final) == r"\frac{\sqrt{8}}{2}"
    assert judge(final, r"\sqrt{2}") == Verdict(True, "math-verify")
    assert judge(final, r"\frac{\sqrt{8}}{2}", "exact") == Verdict(True, "exact")
    assert judge(final, r"\sqrt{2}", "exact") == Verdict(False, "exact")
    assert judge(r"\boxed{\{1, 2\}}", r"\{1,2\}") == Verdict(True, "math-verify")


def test_what_math_verify_cannot_parse_is_matched_exactly():
    assert judge("Yes.", "yes") == Verdict(True, "exact-fallback")
    assert judge("No.", "yes") == Verdict(False, "exact-fallback")
    # math-verify would read both as products of letters (p*a*r*i*s), which match.
    assert judge(r"\boxed{pairs}", "Paris") == Verdict(False, "exact-fallback")
    assert judge(r"\boxed{Paris}", "Paris") == Verdict(True, "exact-fallback")
    # Nothing extracted from the answer: exact matching, which an empty answer fails.
    assert judge("", "23") == Verdict(False, "exact-fallback")


def test_exact_is_not_a_substring_test():
    assert not judge("It is Paris, of course.", "paris").correct
    assert judge("Paris.", "paris").correct
    assert not judge("The final answer is 1234.", "23", "exact").correct


def test_stated_answer():
    assert stated_answer("so 12 then 40") == "40"
    assert stated_answer("The final answer is $\\frac{1}{2}$. I hope it is correct.") == (
        "\\frac{1}{2}"
    )
    assert stated_answer("The Final Answer is: 3.5.") == "3.5"
    assert stated_answer(r"\boxed{x} then the final answer is 7") == "x"
    assert stated_answer(r"\boxed{2} at first, then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert stated_answer("none") is None
    assert stated_answer(r"\boxed{x+") is None  # a cut-off box states nothing


def test_normalize():
    assert normalize("  $1,200$. ") == "1200"
    assert normalize("The  Answer\n") == "the answer"
    assert normalize("1,2") == "1,2"  # not a number with thousands separators
    assert judge("The final answer is 1,200.", "1200", "exact") == Verdict(True, "exact")


def test_a_whole_answer_equal_to_the_reference_matches_exactly():
    # stated_answer would take its last number (2); the whole answer is the reference.
    assert judge("x^2", "x^2", "exact") == Verdict(True, "exact")


def test_judge_works_off_the_main_thread():
    """math-verify's timeouts use signal.alarm, which raises outside the main thread."""
    verdicts: list[Verdict] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            verdicts.append(judge(r"\frac{1}{2}", "0.5"))
            verdicts.append(judge(r"\boxed{x^2+2x+1}", "(x+1)^2"))
            verdicts.append(judge("The final answer is 45.", "46"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not errors and verdicts == [
        Verdict(True, "math-verify"),
        Verdict(True, "math-verify"),
        Verdict(False, "math-verify"),
    ]


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown match method 'fuzzy'"):
        judge("1", "1", "fuzzy")


def test_stated_number():
    assert stated_number("The final answer is 23.") == "23"
    assert stated_number("so 12 then 40") == "40"
    assert stated_number("none") is None
