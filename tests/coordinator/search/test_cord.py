"""CoRD's beam selection as a state machine: feed it generations and scores, check the
beam it keeps, when trajectories complete, who writes the answer, and the output row."""

import json

import pytest

from cord.common import prompts
from cord.common.config import ConfigError, config_from_dict
from cord.common.messages import Generation, Score
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.rows import Stats
from cord.coordinator.search import lookup, make_search, strategy_names, strategy_of
from cord.coordinator.search.base import Trajectory
from cord.coordinator.search.cord import CordSearch


def on_disk(row):
    """A row as its JSONL line holds it (what users load)."""
    return json.loads(row.model_dump_json())


PROBLEM = Problem(id="p1", question="What is 1 + 2 + 3?", answer="6", meta={"source": "lab"})


def make(beam_width=2, samples=1, budget=1000, strategy="cord", answers="best", cut=0):
    cfg = config_from_dict(
        {
            "teachers": [{"name": "alpha", "model": "a"}, {"name": "beta", "model": "b"}],
            "meta_prover": {"name": "meta", "model": "m"},
            "search": {
                "beam_width": beam_width,
                "samples_per_beam": samples,
                "thinking_budget": budget,
                "max_step_tokens": 50,
                "strategy": strategy,
                "answers": answers,
                "straggler_cut": cut,
            },
        }
    )
    search = make_search(PROBLEM, cfg)
    assert isinstance(search, CordSearch)
    return search


def expand_all(search, work, texts):
    """Answer each expand work with texts[teacher][i] -> (text, finish, tokens), i counting
    the answers given. Each new trajectory asks the meta-prover for one score; one that
    another candidate of the step already made asks for none."""
    scores: list = []
    made: set[tuple[str, ...]] = set()
    for i, w in enumerate(work):
        assert w.kind == "expand"
        text, finish, tokens = texts[w.model][i % len(texts[w.model])]
        out = search.on_generation(
            w.key, Generation(key=w.item.key, text=text, finish=finish, tokens=tokens)
        ).work
        step = prompts.clean_step(prompts.step_header(w.item.next_step), text)
        trajectory = (*w.item.steps, step)
        if trajectory in made:
            assert out == []
        else:
            assert [o.kind for o in out] == ["score"] and out[0].model == "meta"
            assert tuple(out[0].item.steps) == trajectory
            made.add(trajectory)
        scores.extend(out)
    return scores


def test_first_step_asks_every_teacher_for_every_beam_and_sample():
    search = make(samples=2)
    work = search.start().work
    assert (
        sorted((w.kind, w.model) for w in work)
        == [("expand", "alpha")] * 2 + [("expand", "beta")] * 2
    )
    assert all(w.item.steps == [] and w.item.next_step == 1 for w in work)
    assert len({w.item.seed for w in work}) == 4
    assert all(w.item.max_new_tokens == 50 and w.item.temperature == 0.6 for w in work)


def test_keeps_top_b_by_score_across_teachers_and_beams():
    search = make(beam_width=2)
    work = search.start().work
    scores = expand_all(
        search, work, {"alpha": [(" 3 + 3", "step", 4)], "beta": [(" 6", "step", 2)]}
    )
    by_text = {s.item.steps[-1]: s for s in scores}
    assert set(by_text) == {"### Step 1. 3 + 3", "### Step 1. 6"}
    next_work = []
    commits = []
    for text, value in (("### Step 1. 3 + 3", 0.4), ("### Step 1. 6", 0.7)):
        w = by_text[text]
        outcome = search.on_score(w.key, Score(key=w.item.key, score=value))
        next_work += outcome.work
        commits.append((outcome.commit, outcome.steps))
    assert commits == [(False, 0), (True, 1)]  # the step is committed once it is chosen
    beams = search.state.beams
    assert [b.texts for b in beams] == [["### Step 1. 6"], ["### Step 1. 3 + 3"]]
    assert [b.score for b in beams] == [0.7, 0.4]
    # Step 2: 2 beams x 2 teachers; the prefix each continues is its beam's text.
    assert len(next_work) == 4 and {tuple(w.item.steps) for w in next_work} == {
        ("### Step 1. 6",),
        ("### Step 1. 3 + 3",),
    }
    assert all(w.item.next_step == 2 for w in next_work)

    # Step 2: four candidates; the top two come from different beams and teachers.
    scores = expand_all(
        search, next_work, {"alpha": [(" 6", "step", 2)], "beta": [(" 6\n", "think_end", 3)]}
    )
    values = {}
    for i, s in enumerate(scores):
        values[s.key] = [0.2, 0.9, 0.5, 0.8][i]
    out = []
    for key, value in values.items():
        out += search.on_score(key, Score(key=str(key), score=value)).work
    ranked = sorted(
        ((v, tuple(s.item.steps)) for s, v in zip(scores, values.values(), strict=True)),
        reverse=True,
    )
    kept = [list(steps) for _, steps in ranked[:2]]
    got = [t.texts for t in (*search.state.completed, *search.state.beams)]
    assert sorted(got) == sorted(kept)


def test_completion_answer_by_last_teacher_and_row():
    search = make(beam_width=1)
    work = search.start().work
    scores = expand_all(
        search, work, {"alpha": [(" 6\n", "think_end", 3)], "beta": [(" 5", "step", 2)]}
    )
    out = []
    for s, value in zip(scores, (0.9, 0.1), strict=True):
        out += search.on_score(
            s.key, Score(key=s.item.key, score=value, prompt_tokens=10, cached_tokens=4)
        ).work
    assert [(w.kind, w.model) for w in out] == [("answer", "alpha")]
    assert not search.finished
    answer = out[0]
    assert answer.item.steps == ["### Step 1. 6"]
    done = search.on_generation(
        answer.key,
        Generation(key=answer.item.key, text="The final answer is 6.", finish="eos", tokens=7),
    )
    assert search.finished and done.commit and done.row is not None
    row = on_disk(search.row())
    assert row["id"] == "p1" and row["source"] == "lab" and row["strategy"] == "cord"
    assert row["final_answer"] == "The final answer is 6." and row["answer_teacher"] == "alpha"
    assert row["correct"] is True and row["correct_by"] == "math-verify"
    assert row["score"] == 0.9 and row["thinking_finish"] == "think_end"
    assert row["steps"] == [
        {"index": 1, "text": "### Step 1. 6", "teacher": "alpha", "score": 0.9, "tokens": 3}
    ]
    assert (
        row["messages"][1]["content"]
        == "<think>\n### Step 1. 6\n</think>\n\nThe final answer is 6."
    )
    assert row["stats"]["tokens_by_teacher"] == {"alpha": 10, "beta": 2}
    assert row["stats"]["scorings"] == 2 and row["stats"]["cached_prompt_tokens"] == 8
    assert row["models"]["meta_prover"] == {"meta": "m"}


@pytest.mark.parametrize(
    ("match", "verdict"), [("math", (True, "math-verify")), ("exact", (False, "exact"))]
)
def test_rows_judge_the_answer_with_the_configured_method(match, verdict):
    cfg = config_from_dict(
        {
            "teachers": [{"name": "alpha", "model": "a"}],
            "meta_prover": {"name": "meta", "model": "m"},
            "eval": {"match": match},
        }
    )
    search = make_search(PROBLEM, cfg)
    row = on_disk(
        search.trace_row(Trajectory(final_answer=r"So \boxed{\frac{12}{2}}."), [], Stats())
    )
    assert (row["correct"], row["correct_by"]) == verdict


def test_thinking_budget_completes_a_beam():
    search = make(beam_width=1, budget=5)
    work = search.start().work
    scores = expand_all(
        search, work, {"alpha": [(" 1 + 1", "length", 5)], "beta": [(" 2", "length", 5)]}
    )
    out = []
    for s, value in zip(scores, (0.3, 0.6), strict=True):
        out += search.on_score(s.key, Score(key=s.item.key, score=value)).work
    assert [(w.kind, w.model) for w in out] == [("answer", "beta")]
    assert search.state.completed[0].finish == "budget"


def score_all(search, scores, values):
    out = []
    for s in scores:
        out += search.on_score(s.key, Score(key=s.item.key, score=values[s.item.steps[-1]])).work
    return out


@pytest.mark.parametrize("answers", ["best", "all"])
def test_which_complete_trajectories_are_answered(answers):
    """Two beams complete one step apart, the later one better. `best`: one answer, for
    the trace, once no beam is live; `all`: one per trajectory as it completes."""
    search = make(beam_width=2, answers=answers)
    scores = expand_all(
        search,
        search.start().work,
        {"alpha": [(" 6\n", "think_end", 3)], "beta": [(" 1 + 2 = 3", "step", 5)]},
    )
    out = score_all(search, scores, {"### Step 1. 6": 0.5, "### Step 1. 1 + 2 = 3": 0.4})
    first_answers = [w for w in out if w.kind == "answer"]
    assert len(search.state.completed) == 1 and len(search.state.beams) == 1
    assert [w.item.steps for w in first_answers] == (
        [] if answers == "best" else [["### Step 1. 6"]]
    )
    step2 = [w for w in out if w.kind == "expand"]
    scores = expand_all(
        search, step2, {"alpha": [(" 3 + 3 = 6\n", "think_end", 6)], "beta": [(" 5", "step", 2)]}
    )
    out = score_all(
        search,
        scores,
        {"### Step 2. 3 + 3 = 6": 0.9, "### Step 2. 5": 0.1},
    )
    assert not search.state.beams  # B = 2: one complete before, the better one now
    answered = [w.item.steps for w in out if w.kind == "answer"]
    better = ["### Step 1. 1 + 2 = 3", "### Step 2. 3 + 3 = 6"]
    assert answered == [better]
    assert not search.finished
    for w in [*first_answers, *[w for w in out if w.kind == "answer"]]:
        search.on_generation(w.key, Generation(key=w.item.key, text="6", finish="eos", tokens=1))
    assert search.finished
    row = on_disk(search.row())
    assert [s["text"] for s in row["steps"]] == better and row["score"] == 0.9
    assert row["final_answer"] == "6" and row["stats"]["answers"] == (1 if answers == "best" else 2)
    (alt,) = row["alternatives"]
    assert alt["score"] == 0.5
    assert alt["final_answer"] == (None if answers == "best" else "6")


def test_identical_trajectories_are_kept_once():
    search = make(beam_width=2)
    work = search.start().work
    scores = expand_all(search, work, {"alpha": [(" 6", "step", 2)], "beta": [(" 6", "step", 2)]})
    for s in scores:
        search.on_score(s.key, Score(key=s.item.key, score=0.5))
    assert [b.texts for b in search.state.beams] == [["### Step 1. 6"]]


def test_a_trajectory_two_teachers_wrote_alike_is_scored_once():
    # Beam width 1, three teachers: alpha and gamma write the same step, beta another.
    search = CordSearch(
        PROBLEM,
        config_from_dict(
            {
                "teachers": [{"name": n, "model": n} for n in ("alpha", "beta", "gamma")],
                "meta_prover": {"name": "meta", "model": "m"},
                "search": {"beam_width": 1, "max_step_tokens": 50},
            }
        ),
    )
    work = {w.model: w for w in search.start().work}

    def gen(teacher, text):
        w = work[teacher]
        result = Generation(key=w.item.key, text=text, finish="step", tokens=2)
        return search.on_generation(w.key, result).work

    (alpha_score,) = gen("alpha", " 1 + 2 = 3")
    assert gen("gamma", " 1 + 2 = 3") == []  # waits for alpha's score
    (beta_score,) = gen("beta", " 3 + 3 = 6")
    assert search.on_score(beta_score.key, Score(key=beta_score.item.key, score=0.2)).work == []
    nxt = search.on_score(alpha_score.key, Score(key=alpha_score.item.key, score=0.7)).work
    # Both copies got S = 0.7; the step was selected once every candidate had a score.
    assert [b.texts for b in search.state.beams] == [["### Step 1. 1 + 2 = 3"]]
    assert search.state.beams[0].score == 0.7 and search.state.beams[0].steps[0].teacher == "alpha"
    assert search.state.stats.scorings == 2 and len(nxt) == 3

    # Step 2: the copy arrives after the score of the first came back.
    work = {w.model: w for w in nxt}
    (beta_score,) = gen("beta", " 6")
    (alpha_score,) = gen("alpha", " 3 + 3 = 6")
    assert search.on_score(alpha_score.key, Score(key=alpha_score.item.key, score=0.9)).work == []
    assert search.on_score(beta_score.key, Score(key=beta_score.item.key, score=0.4)).work == []
    nxt = gen("gamma", " 3 + 3 = 6")  # already scored: selects at once
    assert [b.texts for b in search.state.beams] == [
        ["### Step 1. 1 + 2 = 3", "### Step 2. 3 + 3 = 6"]
    ]
    assert search.state.beams[0].score == 0.9 and len(nxt) == 3
    assert search.state.stats.scorings == 4


def test_a_straggler_cut_selects_without_the_slowest_candidates():
    """beam 2 x 2 teachers x 2 samples: with a cut of 2, step 2 is selected once six of
    its eight candidates are scored; the two left out (one not written yet, one written
    but not scored) are handed back as dropped, and their late results change nothing.
    Without a cut the same scores select nothing."""
    texts = {"alpha": [(" 3 + 3", "step", 4), (" 1 + 5", "step", 4)], "beta": [(" 6", "step", 2)]}
    for cut, selects in ((0, False), (2, True)):
        search = make(beam_width=2, samples=2, cut=cut)
        scores = expand_all(search, search.start().work, texts)
        nxt = []
        for s, v in zip(scores, (0.4, 0.7, 0.5), strict=True):
            nxt += search.on_score(s.key, Score(key=s.item.key, score=v)).work
        assert len(nxt) == 8 and search.state.step == 2
        slow_expand = nxt[-1]  # not written yet
        step2 = expand_all(search, nxt[:-1], texts)  # seven written: six trajectories
        assert len(step2) == 6
        outcomes = [
            search.on_score(s.key, Score(key=s.item.key, score=0.1 * (i + 1)))
            for i, s in enumerate(step2[:-1])  # the last score straggles
        ]
        assert any(o.commit for o in outcomes) is selects
        if not selects:
            assert search.state.step == 2 and all(not o.dropped for o in outcomes)
            continue
        assert search.state.step == 3 and outcomes[-1].commit
        assert sorted(map(str, outcomes[-1].dropped)) == sorted(
            [str(slow_expand.key), str(step2[-1].key)]
        )
        # The best two of the five scored trajectories are the beams.
        assert [b.score for b in search.state.beams] == [0.5, 0.4]
        late = search.on_score(step2[-1].key, Score(key=step2[-1].item.key, score=0.99))
        late_x = search.on_generation(
            slow_expand.key, Generation(key=slow_expand.item.key, text=" 9", tokens=1)
        )
        assert late.work == late_x.work == [] and not late.commit and not late_x.commit
        assert [b.score for b in search.state.beams] == [0.5, 0.4]


def test_duplicates_are_ignored():
    search = make()
    work = search.start().work
    w = work[0]
    assert search.on_generation(w.key, Generation(key=w.item.key, text=" 6", tokens=1)).work
    again = search.on_generation(w.key, Generation(key=w.item.key, text=" 7", tokens=1))
    assert again.work == [] and not again.commit


def test_snapshot_restores_and_resumes_the_same_work():
    search = make(beam_width=2)
    work = search.start().work
    scores = expand_all(
        search, work, {"alpha": [(" 3 + 3", "step", 4)], "beta": [(" 6", "step", 2)]}
    )
    nxt = []
    for s, v in zip(scores, (0.4, 0.7), strict=True):
        nxt += search.on_score(s.key, Score(key=s.item.key, score=v)).work
    resumed = make(beam_width=2)
    resumed.restore(search.snapshot())
    again = resumed.start().work
    assert [(w.item.key, w.item.steps, w.item.seed) for w in again] == [
        (w.item.key, w.item.steps, w.item.seed) for w in nxt
    ]


def first_step(search, scores):
    """Alpha writes a long step, beta a short one; S as given per teacher."""
    written = {"alpha": [(" 1 + 2 = 3, and 3 + 3 = 6", "step", 9)], "beta": [(" 6", "step", 2)]}
    for s in expand_all(search, search.start().work, written):
        teacher = "alpha" if "3 + 3" in s.item.steps[-1] else "beta"
        search.on_score(s.key, Score(key=s.item.key, score=scores[teacher]))
    return [b.steps[0].teacher for b in search.state.beams]


def test_selection_rules_are_parameters():
    scores = {"alpha": 0.2, "beta": 0.9}
    assert first_step(make(beam_width=1), scores) == ["beta"]  # by S
    assert first_step(make(beam_width=1, strategy="longest"), scores) == ["alpha"]
    assert first_step(make(beam_width=2, strategy="greedy"), scores) == ["beta"]  # a beam of 1
    kept = {first_step(make(beam_width=1, strategy="random"), scores)[0] for _ in range(3)}
    assert len(kept) == 1  # seeded: the same choice on every run


def test_the_registry_is_the_one_list_of_strategies():
    assert strategy_names() == [
        "cord", "greedy", "random", "longest", "mcts", "curation", "single:<teacher>"
    ]  # fmt: skip
    assert lookup("single:alpha")[1] == "alpha"
    assert lookup("single") is None and lookup("cord:x") is None and lookup("beam") is None
    with pytest.raises(ValueError, match="unknown strategy 'beam'; use one of cord, greedy"):
        make(strategy="beam")


def test_the_coordinator_names_an_unknown_strategy_as_a_config_error():
    """The workers never read `search.strategy`: the coordinator's edge checks it (the
    CLI, `Coordinator`, `eval`), with the config's name and the field."""
    data = {
        "teachers": [{"name": "alpha", "model": "m/a"}],
        "meta_prover": {"name": "alpha"},
        "search": {"strategy": "beam"},
    }
    cfg = config_from_dict(data)  # what a worker loads
    with pytest.raises(ConfigError) as err:
        strategy_of(cfg, "run.yaml")
    assert str(err.value).splitlines() == [
        "run.yaml: invalid run config:",
        "  search.strategy: unknown strategy 'beam'; use one of cord, greedy, random, "
        "longest, mcts, curation, single:<teacher>",
    ]


def test_failure_rows_name_the_configured_strategy():
    search = make(strategy="greedy")
    row = on_disk(search.failure_row("expand on alpha failed after 3 attempt(s): boom"))
    assert row["strategy"] == "greedy" and row["id"] == "p1" and row["source"] == "lab"
    assert row["reason"].endswith("boom") and row["state"]["step"] == 1
    assert "correct" not in row and "correct_by" not in row  # no answer to judge


def test_a_rows_own_fields_win_over_input_fields_of_the_same_name():
    """A dataset may well have a `score`, `messages` or `reason` column: carried through,
    but under the row's own field of that name."""
    meta = {"score": "high", "messages": ["chat"], "reason": "r", "steps": 3, "level": 5}
    problem = PROBLEM.model_copy(update={"meta": meta})
    search = make_search(problem, make().cfg)
    trace = on_disk(search.trace_row(Trajectory(final_answer="6", score=0.7), [], Stats()))
    assert trace["score"] == 0.7 and trace["steps"] == [] and trace["level"] == 5
    assert [m["role"] for m in trace["messages"]] == ["user", "assistant"]
    assert trace["reason"] == "r"  # not a trace row's field: carried as it came
    failure = on_disk(search.failure_row("boom"))
    assert failure["reason"] == "boom" and failure["score"] == "high"
