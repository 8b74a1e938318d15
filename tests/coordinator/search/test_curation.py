"""The baselines as state machines: curation, single, greedy and random selection."""

import json

import pytest

from cord.common.config import ConfigError, config_from_dict
from cord.common.messages import Generation, Score
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.search import make_search, strategy_of
from cord.coordinator.search.base import split_steps


def on_disk(row):
    """A row as its JSONL line holds it (what users load)."""
    return json.loads(row.model_dump_json())


PROBLEM = Problem(id="p", question="What is 1 + 2 + 3?", answer="6")


def cfg(strategy, **search):
    return config_from_dict(
        {
            "teachers": [{"name": "alpha", "model": "a"}, {"name": "beta", "model": "b"}],
            "meta_prover": {"name": "meta", "model": "m"},
            "search": {"strategy": strategy, "beam_width": 2, "thinking_budget": 100, **search},
        }
    )


def test_split_steps_keeps_headers_and_shares_tokens():
    steps = split_steps(" 3 + 3\n### Step 2. 6\n", "alpha", 10)
    assert [s.text for s in steps] == ["### Step 1. 3 + 3", "### Step 2. 6"]
    assert sum(s.tokens for s in steps) == 10 and all(s.score is None for s in steps)


def test_curation_writes_n_whole_trajectories_per_teacher_and_keeps_the_best():
    search = make_search(PROBLEM, cfg("curation"))
    work = search.start().work
    # N defaults to beam_width x samples_per_beam = 2 per teacher
    assert sorted(w.model for w in work) == ["alpha", "alpha", "beta", "beta"]
    assert all(w.item.whole and w.item.max_new_tokens == 100 and w.item.steps == [] for w in work)
    texts = {
        "alpha": [" 3 + 3\n### Step 2. 6\n", " 3 + 3\n### Step 2. 7\n"],
        "beta": [" 3 + 3\n### Step 2. 5\n", " 4 + 3\n### Step 2. 7\n"],
    }
    scores = []
    for w in work:
        text = texts[w.model].pop(0)
        scores += search.on_generation(
            w.key, Generation(key=w.item.key, text=text, finish="think_end", tokens=9)
        ).work
    assert len(scores) == 4 and all(s.kind == "score" for s in scores)
    by_last = {s.item.steps[-1]: s for s in scores}
    values = {"### Step 2. 6": 0.9, "### Step 2. 7": 0.3, "### Step 2. 5": 0.2}
    out = []
    for s in scores:
        out += search.on_score(s.key, Score(key=s.item.key, score=values[s.item.steps[-1]])).work
    assert by_last["### Step 2. 6"].item.steps == ["### Step 1. 3 + 3", "### Step 2. 6"]
    assert [(w.kind, w.model) for w in out] == [("answer", "alpha")]
    done = search.on_generation(
        out[0].key,
        Generation(key=out[0].item.key, text="The final answer is 6.", finish="eos", tokens=7),
    )
    assert search.finished and done.row is not None and done.row.strategy == "curation"
    row = on_disk(search.row())
    assert row["strategy"] == "curation" and row["score"] == 0.9
    assert [s["teacher"] for s in row["steps"]] == ["alpha", "alpha"]
    assert row["stats"]["tokens_by_teacher"] == {"alpha": 25, "beta": 18}
    assert len(row["alternatives"]) == 3


def test_single_teacher_writes_one_trajectory():
    search = make_search(PROBLEM, cfg("single:beta"))
    (work,) = search.start().work
    assert work.model == "beta" and work.item.whole
    (score,) = search.on_generation(
        work.key, Generation(key=work.item.key, text=" 6\n", finish="think_end", tokens=2)
    ).work
    (answer,) = search.on_score(score.key, Score(key=score.item.key, score=0.4)).work
    assert answer.model == "beta"
    done = search.on_generation(answer.key, Generation(key=answer.item.key, text="6", tokens=1))
    assert done.row is not None and done.row.strategy == "single:beta"


def test_single_must_name_a_teacher():
    with pytest.raises(ConfigError, match=r"search\.strategy: 'single:gamma' names no teacher"):
        strategy_of(cfg("single:gamma"))


def run_step(search, work, values):
    scores = []
    for w, text in zip(work, [" 3 + 3", " 4 + 2", " 9", " 2 + 4"], strict=False):
        scores += search.on_generation(
            w.key, Generation(key=w.item.key, text=text, finish="step", tokens=3)
        ).work
    for s, v in zip(scores, values, strict=True):
        search.on_score(s.key, Score(key=s.item.key, score=v))
    return scores


def test_greedy_keeps_one_beam():
    search = make_search(PROBLEM, cfg("greedy"))
    run_step(search, search.start().work, [0.1, 0.8])
    assert [b.texts for b in search.state.beams] == [["### Step 1. 4 + 2"]]


def test_random_selection_ignores_scores_but_is_seeded():
    kept = []
    for _ in range(2):
        search = make_search(PROBLEM, cfg("random", beam_width=1))
        run_step(search, search.start().work, [0.0, 1.0])
        kept.append(search.state.beams[0].texts)
    assert kept[0] == kept[1]
    chosen = set()
    for seed in range(12):
        search = make_search(PROBLEM, cfg("random", beam_width=1, seed=seed))
        run_step(search, search.start().work, [0.0, 1.0])
        chosen.add(search.state.beams[0].texts[0])
    assert chosen == {"### Step 1. 3 + 3", "### Step 1. 4 + 2"}
