"""`cord-coord eval`: strategies side by side through the live fleet."""

import json

import pytest
from click.testing import CliRunner

from cord.coordinator.cli import main
from cord.coordinator.evaluate import StrategyResult, format_table
from cord.coordinator.matching import judge
from cord.coordinator.rows import auroc, summarize
from cord.lab.arith import EVAL_SEED, make_problems
from tests.conftest import fleet_config
from tests.coordinator.conftest import failure_row, trace_row


@pytest.mark.parametrize("method", ["math", "exact"])
def test_answers_are_judged(method):
    assert judge("The final answer is 23.", "23", method).correct
    assert not judge("The final answer is 230.", "23", method).correct
    assert not judge("", "23", method).correct
    # The answer the trace states, not a substring of its text (cord.coordinator.matching).
    assert judge("Paris.", "paris", method).correct
    assert not judge("It is Paris, of course.", "paris", method).correct


def test_accuracy_and_auroc_use_the_rows_verdicts():
    rows = [
        trace_row("a", final_answer="The final answer is 7.", score=0.8, correct=True),
        trace_row("b", final_answer="The final answer is 7.", score=0.1, correct=False),
        trace_row("c", final_answer="The final answer is 9.", score=0.9, correct=True),
    ]
    result = StrategyResult("cord", rows, [failure_row("d")], wall_s=1.5)
    m = result.metrics()
    assert m["accuracy"] == 0.5 and m["problems"] == 4 and m["failed"] == 1
    assert m["auroc"] == 1.0 and m["wall_s"] == 1.5  # the strategy's run, not a mean
    # One function for every summary: eval's figures are `rows.summarize`'s.
    assert {k: v for k, v in m.items() if k != "wall_s"} == summarize(
        rows, [failure_row("d")]
    ).model_dump()


def test_auroc():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5], [0.5]) == 0.5
    assert auroc([], [0.1]) is None


@pytest.mark.redis
@pytest.mark.slow
def test_cord_beats_every_single_teacher_on_20_problems(fleet, tmp_path):
    """The lab's central claim, small: on 20 held-out problems CoRD's traces are right
    more often than those of any teacher alone."""
    config, _ = fleet_config(fleet, tmp_path / "run.yaml", beam_width=4)
    problems = tmp_path / "p.jsonl"
    problems.write_text(
        "".join(json.dumps(p.to_json()) + "\n" for p in make_problems(20, EVAL_SEED))
    )
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--config",
            str(config),
            "--problems",
            str(problems),
            "--json",
            "--strategies",
            "cord,single:alpha,single:beta,single:gamma",
            "--out",
            str(tmp_path / "ev"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    s = report["strategies"]
    assert set(s) == {"cord", "single:alpha", "single:beta", "single:gamma"}
    for name in ("single:alpha", "single:beta", "single:gamma"):
        assert s["cord"]["accuracy"] > s[name]["accuracy"], report
    assert all(m["problems"] == 20 and m["failed"] == 0 for m in s.values())
    # every strategy's rows carry their strategy, and each problem comes out once
    for name in s:
        rows = [
            json.loads(x)
            for x in (tmp_path / "ev" / name.replace(":", "-") / "traces.jsonl")
            .read_text()
            .splitlines()
        ]
        assert len({r["id"] for r in rows}) == len(rows) == 20
        assert {r["strategy"] for r in rows} == {name}
    # a single teacher generates ~1 trajectory per problem, CoRD several per step
    assert s["cord"]["mean_generated_tokens"] > s["single:alpha"]["mean_generated_tokens"]
    assert "AUROC" in format_table(report)


def test_curation_samples_match_cord_tokens():
    from cord.common.config import config_from_dict
    from cord.coordinator.evaluate import matched_curation_samples

    cfg = config_from_dict(
        {
            "teachers": [{"name": t, "model": t} for t in ("a", "b", "c")],
            "meta_prover": {"name": "m", "model": "m"},
        }
    )
    stats = {"thinking_tokens": 90, "answer_tokens": 10}
    rows = [
        trace_row(str(i), stats={**stats, "tokens_by_teacher": dict.fromkeys("abc", 200)})
        for i in range(3)
    ]
    # 600 tokens per problem over 3 teachers x 100 tokens per whole trajectory
    assert matched_curation_samples(cfg, rows) == 2
    # 610 would not fit in 2 per teacher: curation gets 3, never less than CoRD's budget
    more = [
        trace_row(str(i), stats={**stats, "tokens_by_teacher": {"a": 210, "b": 200, "c": 200}})
        for i in range(3)
    ]
    assert matched_curation_samples(cfg, more) == 3


@pytest.mark.redis
@pytest.mark.slow
def test_mcts_and_longest_through_the_fleet(fleet, tmp_path):
    """The paper's two missing comparisons as `eval` runs them: MCTS with its token
    budget matched to CoRD's on the same problems, and the longest-step ablation. Every
    problem comes out once per strategy, as a valid trace naming its strategy."""
    config, _ = fleet_config(fleet, tmp_path / "run.yaml")
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(p.to_json()) + "\n" for p in make_problems(4, 8080)))
    args = ["eval", "--config", str(config), "--problems", str(problems), "--json"]
    args += ["--strategies", "cord,mcts,longest", "--out", str(tmp_path / "ev")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    cord_tokens = report["strategies"]["cord"]["mean_generated_tokens"]
    assert report["mcts_tokens"] == pytest.approx(cord_tokens, abs=1)  # matched budget
    for name in ("mcts", "longest"):
        m = report["strategies"][name]
        assert m["problems"] == 4 and m["failed"] == 0
        rows = [json.loads(x) for x in (tmp_path / "ev" / name / "traces.jsonl").open()]
        assert sorted(r["id"] for r in rows) == sorted(p.id for p in make_problems(4, 8080))
        for r in rows:
            assert r["strategy"] == name and r["final_answer"] and r["steps"]
            assert [s["index"] for s in r["steps"]] == list(range(1, len(r["steps"]) + 1))
            assert r["messages"][1]["content"].startswith("<think>\n### Step 1.")
    mcts_rows = [json.loads(x) for x in (tmp_path / "ev" / "mcts" / "traces.jsonl").open()]
    # MCTS spends about CoRD's budget: never more than one expansion round beyond it
    for r in mcts_rows:
        expansions = sum(r["stats"]["tokens_by_teacher"].values()) - r["stats"]["answer_tokens"]
        assert expansions <= report["mcts_tokens"] + 3 * 48 + 400
