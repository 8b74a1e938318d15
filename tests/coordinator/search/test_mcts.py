"""MCTS over steps as a state machine: which leaf UCB expands, how S is backed up, when
the token budget ends the search, and the trace it picks."""

import json
import math

from cord.common.config import config_from_dict
from cord.common.messages import Generation, Score
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.search import make_search
from cord.coordinator.search.mcts import MctsSearch


def on_disk(row):
    """A row as its JSONL line holds it (what users load)."""
    return json.loads(row.model_dump_json())


PROBLEM = Problem(id="p1", question="What is 1 + 2 + 3?", answer="6")


def make(tokens: int, c: float = 1.0) -> MctsSearch:
    cfg = config_from_dict(
        {
            "teachers": [{"name": "alpha", "model": "a"}, {"name": "beta", "model": "b"}],
            "meta_prover": {"name": "meta", "model": "m"},
            "search": {
                "strategy": "mcts",
                "mcts_tokens": tokens,
                "mcts_c": c,
                "thinking_budget": 100,
                "max_step_tokens": 20,
            },
        }
    )
    search = make_search(PROBLEM, cfg)
    assert isinstance(search, MctsSearch)
    return search


def iterate(search, work, written, scores):
    """Answer one expansion: written[teacher] = (text, finish, tokens); scores[teacher]."""
    assert sorted(w.model for w in work) == ["alpha", "beta"] and {w.kind for w in work} == {
        "expand"
    }
    to_score = {}
    for w in work:
        text, finish, tokens = written[w.model]
        out = search.on_generation(
            w.key, Generation(key=w.item.key, text=text, finish=finish, tokens=tokens)
        )
        (score,) = out.work
        assert score.kind == "score" and score.item.steps[-1].endswith(text.rstrip())
        to_score[w.model] = score
    outcome = None
    for teacher, score in to_score.items():
        outcome = search.on_score(score.key, Score(key=score.item.key, score=scores[teacher]))
    assert outcome is not None and outcome.commit and outcome.steps == 1
    return outcome


def test_ucb_expands_the_better_child_and_backs_s_up():
    search = make(tokens=1000)
    out = iterate(
        search,
        search.start().work,
        {"alpha": (" 1 + 2 = 3", "step", 5), "beta": (" 1 + 3 = 4", "step", 5)},
        {"alpha": 0.8, "beta": 0.2},
    )
    nodes = search.state.nodes
    assert len(nodes) == 3 and nodes[0].visits == 2 and math.isclose(nodes[0].value, 1.0)
    alpha = next(i for i, n in enumerate(nodes) if n.trajectory.last_teacher == "alpha")
    # Both children seen once: the same exploration bonus, so the higher S is expanded.
    assert search.state.expanding == alpha
    assert all(w.item.steps == nodes[alpha].trajectory.texts for w in out.work)
    assert all(w.item.next_step == 2 for w in out.work)

    # Its children score low: the other child's UCB wins the next iteration.
    out = iterate(
        search,
        out.work,
        {"alpha": (" 3 + 4 = 8", "step", 5), "beta": (" 3 + 9 = 9", "step", 5)},
        {"alpha": 0.05, "beta": 0.05},
    )
    assert nodes[alpha].visits == 3 and math.isclose(nodes[alpha].value, 0.9)
    beta = next(i for i in nodes[0].children if i != alpha)
    mean_alpha = 0.9 / 3
    assert 0.2 + math.sqrt(math.log(4) / 1) > mean_alpha + math.sqrt(math.log(4) / 3)
    assert search.state.expanding == beta


def test_budget_ends_the_search_with_the_best_complete_trajectory():
    search = make(tokens=20)
    out = iterate(
        search,
        search.start().work,
        {"alpha": (" 6\n", "think_end", 6), "beta": (" 5\n", "think_end", 6)},
        {"alpha": 0.9, "beta": 0.3},
    )
    # Both children complete: nothing left to grow, the best by S gets its answer.
    ((answer,),) = [out.work]
    assert answer.kind == "answer" and answer.model == "alpha"
    assert answer.item.steps == ["### Step 1. 6"]
    done = search.on_generation(answer.key, Generation(key=answer.item.key, text="6", tokens=1))
    assert done.row is not None and search.finished
    row = on_disk(done.row)
    assert row["strategy"] == "mcts" and row["final_answer"] == "6" and row["score"] == 0.9
    assert [a["score"] for a in row["alternatives"]] == [0.3]
    assert row["stats"]["tokens_by_teacher"] == {"alpha": 7, "beta": 6}


def test_with_no_complete_trajectory_the_best_leaf_is_written_to_its_end():
    search = make(tokens=10)
    out = iterate(
        search,
        search.start().work,
        {"alpha": (" 1 + 2", "step", 6), "beta": (" 1 + 5", "step", 6)},
        {"alpha": 0.1, "beta": 0.7},
    )
    (finish,) = out.work  # 12 tokens spent of 10: no more expansions
    assert finish.kind == "expand" and finish.model == "beta" and finish.item.whole
    assert finish.item.steps == ["### Step 1. 1 + 5"] and finish.item.next_step == 2
    text = " = 3\n### Step 3. 3 + 3 = 6\n"
    gen = Generation(key=finish.item.key, text=text, finish="think_end", tokens=8)
    (score,) = search.on_generation(finish.key, gen).work
    assert score.item.steps == ["### Step 1. 1 + 5", "### Step 2. = 3", "### Step 3. 3 + 3 = 6"]
    (answer,) = search.on_score(score.key, Score(key=score.item.key, score=0.6)).work
    done = search.on_generation(answer.key, Generation(key=answer.item.key, text="6"))
    assert done.row is not None
    row = on_disk(done.row)
    assert [s["index"] for s in row["steps"]] == [1, 2, 3]
    assert row["score"] == 0.6 and row["thinking_finish"] == "think_end"


def test_snapshot_resumes_the_expansion_under_way():
    search = make(tokens=1000)
    out = iterate(
        search,
        search.start().work,
        {"alpha": (" 1 + 2 = 3", "step", 5), "beta": (" 1 + 3 = 4", "step", 5)},
        {"alpha": 0.8, "beta": 0.2},
    )
    resumed = make(tokens=1000)
    resumed.restore(search.snapshot())
    again = resumed.start().work
    assert [(str(w.key), w.item.steps, w.item.seed) for w in again] == [
        (str(w.key), w.item.steps, w.item.seed) for w in out.work
    ]
