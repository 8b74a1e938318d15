import random

from cord.lab.arith import (
    WEAKNESSES,
    as_steps,
    held_out_terms,
    make_problems,
    solution_steps,
    valid_steps,
    weak_lines,
)

TERMS = (8, 2, 3, 7, 8, 6, 4, 8)


def test_solution_rewrites_one_addition_per_step():
    assert solution_steps((3, 4, 2, 9, 5)) == [
        "### Step 1. 7 + 2 + 9 + 5",
        "### Step 2. 9 + 9 + 5",
        "### Step 3. 18 + 5",
        "### Step 4. 23",
    ]


def test_each_weakness_errs_only_where_it_applies():
    rng = random.Random(0)
    assert weak_lines(TERMS, "carry", 1.0, rng)[:2] == [
        "0 + 3 + 7 + 8 + 6 + 4 + 8",
        "3 + 7 + 8 + 6 + 4 + 8",
    ]
    assert weak_lines(TERMS, "no_carry", 1.0, rng)[:2] == [
        "10 + 3 + 7 + 8 + 6 + 4 + 8",
        "23 + 7 + 8 + 6 + 4 + 8",
    ]
    large = weak_lines(TERMS, "large", 1.0, rng)
    assert large[:4] == [
        "10 + 3 + 7 + 8 + 6 + 4 + 8",
        "13 + 7 + 8 + 6 + 4 + 8",
        "20 + 8 + 6 + 4 + 8",
        "28 + 6 + 4 + 8",
    ]
    assert large[4:] == ["34 + 4 + 8", "28 + 8", "36"]  # from 34 on: 34 + 4 -> 28
    assert weak_lines(TERMS, "carry", 0.0, rng) == weak_lines(TERMS, None, 0.0, rng)


def test_weaknesses_never_all_apply_to_one_addition():
    """At every addition some teacher is reliable (carry and no_carry exclude each other)."""
    carry, no_carry = WEAKNESSES["carry"][0], WEAKNESSES["no_carry"][0]
    assert all(carry(a, b) != no_carry(a, b) for a in range(1, 120) for b in range(1, 10))


def test_problem_sets_are_deterministic_and_held_out_is_known():
    assert make_problems(5, 3) == make_problems(5, 3)
    assert make_problems(5, 3) != make_problems(5, 4)
    held = held_out_terms()
    assert all(p.terms in held for p in make_problems(300, 7))


def test_valid_steps_counts_the_sound_rewrites_only():
    terms = (1, 6, 2, 9, 3, 5)
    assert valid_steps(terms, solution_steps(terms)) == 5
    # A right final answer by a wrong process (a CoRD trace of the lab): only 17 + 3 -> 20
    # rewrites its line right; the errors before and after cancel out.
    steps = as_steps(["3 + 2 + 9 + 3 + 5", "9 + 9 + 3 + 5", "17 + 3 + 5", "20 + 5", "26"])
    assert valid_steps(terms, steps) == 1
    assert valid_steps(terms, ["### Step 1. no number"]) == 0
