"""The whole fleet: real Redis, real `cord-worker` processes (alpha, beta, gamma, meta), the
coordinator, the bundled tiny models. Asserts on the JSONL rows."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from cord.common import prompts
from cord.common.scoring import predictive_score
from cord.coordinator.cli import main
from cord.coordinator.matching import judge
from cord.lab.arith import make_problems
from cord.lab.cli import main as lab
from tests.conftest import MODELS, VLLM_TEST, base_config, fleet_config, local_fleet, write_config

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def cli(*args, group=main):
    result = CliRunner().invoke(group, list(map(str, args)), catch_exceptions=False)
    return result


def direct_score(model, tok, question, steps, answer):
    ctx = tok(
        prompts.chat_prefix(tok, question) + prompts.scoring_context(steps),
        add_special_tokens=False,
    )["input_ids"]
    ans = tok(prompts.answer_target(answer), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + ans])).logits[0].float(), -1)
    return predictive_score([float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans)])


def test_ten_problems_through_the_fleet(fleet, tmp_path, redis_client):
    """Two teachers and a meta-prover, B = 2 (the spine's end-to-end case). One long test:
    every field of one run's rows is checked against what the models compute alone, and
    a second run to split it would cost as much again."""
    config, cfg = fleet_config(fleet, tmp_path / "run.yaml", teachers=("alpha", "beta"))
    problems = make_problems(10, seed=424242)
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({**p.to_json(), "source": "e2e"}) + "\n" for p in problems))
    assert "enqueued 10 new problem(s)" in cli("enqueue", "--config", config, path).output
    out = tmp_path / "out"
    result = cli("run", "--config", config, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["done"] == 10 and summary["failed"] == 0

    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in problems)
    assert not (out / "failed.jsonl").exists() or (out / "failed.jsonl").read_text() == ""
    meta = AutoModelForCausalLM.from_pretrained(cfg.pool("meta").model)
    meta_tok = AutoTokenizer.from_pretrained(cfg.pool("meta").model)
    chosen_teachers: set[str] = set()
    for row in rows:
        source = next(p for p in problems if p.id == row["id"])
        assert row["question"] == source.question and row["reference_answer"] == source.answer
        assert row["source"] == "e2e" and row["strategy"] == "cord"
        steps = row["steps"]
        assert steps and [s["index"] for s in steps] == list(range(1, len(steps) + 1))
        assert all(s["text"].startswith(f"### Step {s['index']}.") for s in steps)
        assert all(s["teacher"] in {"alpha", "beta"} and s["tokens"] >= 1 for s in steps)
        chosen_teachers.update(s["teacher"] for s in steps)
        assert row["score"] == steps[-1]["score"] and 0.0 < row["score"] <= 1.0
        assert row["answer_teacher"] == steps[-1]["teacher"]
        # Whether the answer is right, decided as cord.coordinator.matching decides it.
        verdict = judge(row["final_answer"], source.answer, cfg.eval.match)
        assert isinstance(row["correct"], bool) and row["correct"] == verdict.correct
        assert row["correct_by"] == verdict.by
        assert row["thinking_finish"] in {"think_end", "eos", "budget"}
        assert sum(s["tokens"] for s in steps) <= cfg.search.thinking_budget
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": source.question}
        assert assistant["role"] == "assistant"
        assert assistant["content"] == prompts.assistant_message(
            [s["text"] for s in steps], row["final_answer"]
        )
        stats = row["stats"]
        assert set(stats["tokens_by_teacher"]) == {"alpha", "beta"}
        assert stats["steps"] == len(steps) and stats["expansions"] >= 2 * len(steps) - 1
        # Every distinct candidate trajectory is scored once (copies share a score), so
        # each step's kept candidate was scored and no expansion twice.
        assert len(steps) <= stats["scorings"] <= stats["expansions"]
        assert 0 <= stats["cached_prompt_tokens"] <= stats["prompt_tokens"]
        assert len(row["alternatives"]) <= 1  # B = 2
        assert all(a["score"] <= row["score"] for a in row["alternatives"])
        assert row["models"]["teachers"] == {
            "alpha": cfg.teacher("alpha").model,
            "beta": cfg.teacher("beta").model,
        }
        # The score in the row is the meta-prover's S, recomputed here without the fleet.
        expected = direct_score(
            meta, meta_tok, source.question, [s["text"] for s in steps], source.answer
        )
        assert row["score"] == pytest.approx(expected, rel=1e-3)
    assert chosen_teachers == {"alpha", "beta"}
    assert any(r["correct"] for r in rows)  # the lab's teachers get some right
    # Prefix caching worked across steps.
    assert sum(r["stats"]["cached_prompt_tokens"] for r in rows) > 0
    for p in problems:
        assert redis_client.sismember(f"{cfg.namespace}:done", p.id)

    # Exactly once: enqueueing and running again changes nothing.
    assert (
        "enqueued 0 new problem(s); 10 already known"
        in cli("enqueue", "--config", config, path).output
    )
    again = cli("run", "--config", config, "--out", out, "--no-progress")
    assert json.loads(again.output.strip().splitlines()[-1])["done"] == 0
    assert len((out / "traces.jsonl").read_text().splitlines()) == 10


def test_status_sees_the_live_workers(fleet):
    config, _ = fleet
    status = json.loads(cli("status", "--config", config, "--json").output)
    assert status["live_workers"] == {"alpha": 1, "beta": 1, "gamma": 1, "meta": 1}
    assert all(n == 0 for n in status["queues"].values())


def test_engine_failure_becomes_a_failure_record(fleet, tmp_path):
    """A problem longer than the models' context fails with its reason; the others in
    the same run are unaffected."""
    config, _ = fleet
    long_q = "What is " + " + ".join(["1"] * 1500) + "?"
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"id": "too-long", "question": long_q, "answer": "1500"})
        + "\n"
        + json.dumps({"id": "fine-1", "question": "What is 2 + 3?", "answer": "5"})
        + "\n"
    )
    cli("enqueue", "--config", config, path)
    out = tmp_path / "out"
    result = cli("run", "--config", config, "--out", out, "--no-progress")
    assert result.exit_code == 0
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failed] == ["too-long"]
    assert "exceed the context" in failed[0]["reason"]
    traces = [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]
    assert [t["id"] for t in traces] == ["fine-1"]


def test_fleet_with_vllm_pools(vllm_urls, tmp_path, redis_url, redis_client, namespace):
    """A teacher (alpha) and the meta-prover on vLLM servers, beta and gamma on `hf`:
    every problem comes out once, rows valid, S as the meta-prover computes it, and the
    servers' cache hits counted in the rows' stats."""
    data = base_config(redis_url, namespace)
    server = {k: v for k, v in VLLM_TEST.items() if k not in ("startup_timeout_s",)}
    for pool in [*data["teachers"], data["meta_prover"]]:
        if pool["name"] in vllm_urls:
            pool.update(server, vllm_url=vllm_urls[pool["name"]])
    config = write_config(tmp_path / "vllm.yaml", data)
    workers = local_fleet(config, tmp_path)
    try:
        workers.up()
        problems = make_problems(6, seed=616161)
        path = tmp_path / "problems.jsonl"
        path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
        assert "enqueued 6 new problem(s)" in cli("enqueue", "--config", config, path).output
        out = tmp_path / "out"
        result = cli("run", "--config", config, "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
    finally:
        workers.stop()
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in problems)
    assert not (out / "failed.jsonl").exists() or (out / "failed.jsonl").read_text() == ""
    meta_path = str(MODELS / "meta")
    meta = AutoModelForCausalLM.from_pretrained(meta_path)
    meta_tok = AutoTokenizer.from_pretrained(meta_path)
    teachers: set[str] = set()
    for row in rows:
        source = next(p for p in problems if p.id == row["id"])
        steps = row["steps"]
        assert steps and [s["index"] for s in steps] == list(range(1, len(steps) + 1))
        assert all(s["text"].startswith(f"### Step {s['index']}.") for s in steps)
        teachers.update(s["teacher"] for s in steps)
        expected = direct_score(
            meta, meta_tok, source.question, [s["text"] for s in steps], source.answer
        )
        assert row["score"] == pytest.approx(expected, abs=1e-3)
        assert row["final_answer"] and row["strategy"] == "cord"
        assert 0 < row["stats"]["cached_prompt_tokens"] <= row["stats"]["prompt_tokens"]
    assert "alpha" in teachers  # the vLLM teacher wrote chosen steps


def test_gsm8k_and_math_shaped_parquet_in_a_training_set_and_a_report_out(fleet, tmp_path):
    """The path the README shows a user: datasets shaped as GSM8K and MATH write them,
    enqueued with the mapping flags, run, exported for SFT and reported."""
    import datasets

    config, _ = fleet_config(fleet, tmp_path / "run.yaml")
    gsm8k, math = tmp_path / "gsm8k.parquet", tmp_path / "math.parquet"
    for like, path, seed in (("gsm8k", gsm8k, 161601), ("math", math, 161602)):
        made = cli("problems", "--n", 3, "--seed", seed, "--like", like, "--out", path, group=lab)
        assert made.exit_code == 0, made.output
    result = cli("enqueue", "--config", config, gsm8k, "--answer-from", "gsm8k")
    assert "enqueued 3 new problem(s)" in result.output, result.output
    mapping = ["--question-field", "problem", "--answer-field", "solution"]
    mapping += ["--answer-from", "boxed", "--id-field", "unique_id"]
    result = cli("enqueue", "--config", config, math, *mapping)
    assert "enqueued 3 new problem(s)" in result.output, result.output

    out = tmp_path / "out"
    result = cli("run", "--config", config, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    expected = {p.question: p.answer for p in make_problems(3, 161601) + make_problems(3, 161602)}
    assert {r["question"]: r["reference_answer"] for r in rows} == expected
    by_id = {r["id"]: r for r in rows}
    assert {f"lab/arith-161602-{i}.json" for i in range(3)} <= set(by_id)
    # The worked solutions the references came from travel with the rows.
    worked = [r for r in rows if "answer" in r]
    assert len(worked) == 3 and sum("solution" in r for r in rows) == 3
    assert all(r["answer"].endswith(f"#### {r['reference_answer']}") for r in worked)

    sft = tmp_path / "sft.parquet"
    result = cli("export", "--in", out, "--format", "parquet", "--out", sft)
    assert result.exit_code == 0, result.output
    loaded = datasets.load_dataset("parquet", data_files=str(sft), split="train")
    assert sorted(loaded["id"]) == sorted(by_id)
    for got in loaded:
        row = by_id[got["id"]]
        assert got["messages"] == row["messages"] and got["score"] == row["score"]
        assert got["correct"] == row["correct"] and got["completion"] == row["messages"][1:]

    report = tmp_path / "report"
    result = cli("report", "--in", out, "--out", report)
    assert result.exit_code == 0, result.output
    html = (report / "index.html").read_text()
    pngs = sorted(report.glob("*.png"))
    assert pngs and all(f'src="{p.name}"' in html for p in pngs)
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
