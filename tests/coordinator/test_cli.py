import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cord.coordinator.cli import main
from tests.conftest import base_config, write_config
from tests.coordinator.inputs.test_sources import GSM8K, MATH, parquet

pytestmark = pytest.mark.redis


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def test_bad_file_enqueues_nothing_and_names_lines(make_config, tmp_path, redis_client, namespace):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2"}\nnope\n')
    result = run("enqueue", "--config", config, path)
    assert result.exit_code == 2
    assert "line 2, field `answer`: missing; add a `answer` string" in result.output
    assert "line 3: not valid JSON" in result.output
    assert "nothing enqueued" in result.output
    assert redis_client.hlen(f"{namespace}:problems") == 0


def test_skip_invalid_writes_rejects(make_config, tmp_path, redis_client, namespace):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2"}\n')
    result = run("enqueue", "--config", config, "--skip-invalid", path)
    assert result.exit_code == 0, result.output
    assert "enqueued 1 new problem(s)" in result.output
    rejects = [
        json.loads(x) for x in (tmp_path / "p.jsonl.rejected.jsonl").read_text().splitlines()
    ]
    assert rejects == [
        {
            "line": 2,
            "field": "answer",
            "error": "missing",
            "fix": "add a `answer` string, or name the field that holds it with --answer-field",
            "raw": '{"question": "q2"}',
        }
    ]
    again = run("enqueue", "--config", config, "--skip-invalid", path)
    assert "enqueued 0 new problem(s); 1 already known" in again.output


def test_status_json(make_config, tmp_path, namespace):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q1", "answer": "1"}\n{"question": "q2", "answer": "2"}\n')
    run("enqueue", "--config", config, path)
    status = json.loads(run("status", "--config", config, "--json").output)
    assert status["queued"] == 2 and status["in_flight"] == 0
    assert status["done"] == 0 and status["failed"] == 0
    assert set(status["live_workers"]) == {"alpha", "beta", "gamma", "meta"}
    assert status["queues"] == {
        f"{namespace}.expand.alpha": 0,
        f"{namespace}.expand.beta": 0,
        f"{namespace}.expand.gamma": 0,
        f"{namespace}.score.meta": 0,
    }


def stored(redis_client, namespace) -> dict[str, dict]:
    """The problems `enqueue` stored, by id, in queue order."""
    ids = [x.decode() for x in redis_client.lrange(f"{namespace}:queue", 0, -1)]
    return {i: json.loads(redis_client.hget(f"{namespace}:problems", i)) for i in ids}


def test_gsm8k_and_math_parquet_with_the_mapping_flags(
    make_config, tmp_path, redis_client, namespace
):
    config, _ = make_config()
    gsm8k = parquet(tmp_path / "gsm8k.parquet", GSM8K)
    result = run("enqueue", "--config", config, "--answer-from", "gsm8k", gsm8k)
    assert result.exit_code == 2
    assert "(Parquet)" in result.output
    assert "row 3, field `answer`: has no `#### <answer>` line" in result.output
    assert "1 bad row(s); nothing enqueued" in result.output
    assert stored(redis_client, namespace) == {}

    result = run("enqueue", "--config", config, "--answer-from", "gsm8k", "--skip-invalid", gsm8k)
    assert result.exit_code == 0, result.output
    assert "enqueued 2 new problem(s)" in result.output
    [reject] = [json.loads(x) for x in Path(f"{gsm8k}.rejected.jsonl").read_text().splitlines()]
    assert (reject["row"], reject["field"]) == (3, "answer")
    assert json.loads(reject["raw"]) == {
        "question": GSM8K["question"][2],
        "answer": GSM8K["answer"][2],
    }

    math = parquet(tmp_path / "math.parquet", MATH)
    flags = ["--question-field", "problem", "--answer-field", "solution"]
    flags += ["--answer-from", "boxed", "--id-field", "unique_id", "--skip-invalid"]
    result = run("enqueue", "--config", config, *flags, math)
    assert result.exit_code == 0, result.output
    problems = stored(redis_client, namespace)
    assert [(p["question"], p["answer"]) for p in problems.values()] == [
        (GSM8K["question"][0], "72"),
        (GSM8K["question"][1], "1200"),
        (MATH["problem"][0], "\\frac{1}{2}"),
        (MATH["problem"][1], "x = \\{3\\}"),
    ]
    assert problems["test/prealgebra/1.json"]["meta"]["level"] == "Level 1"


def test_the_run_config_maps_fields_and_flags_override_it(
    make_config, tmp_path, redis_client, namespace, redis_url
):
    data = base_config(redis_url, namespace)
    data["input"] = {
        "question_field": "problem",
        "answer_field": "solution",
        "answer_from": "boxed",
    }
    config = write_config(tmp_path / "mapped.yaml", data)
    math = parquet(tmp_path / "math.parquet", MATH)
    result = run("enqueue", "--config", config, math)
    assert "row 3, field `solution`: has no complete `\\boxed{...}`" in result.output
    assert result.exit_code == 2
    result = run("enqueue", "--config", config, "--answer-from", "field", math)
    assert result.exit_code == 0, result.output
    answers = [p["answer"] for p in stored(redis_client, namespace).values()]
    assert answers == MATH["solution"]
    result = run("enqueue", "--config", config, "--answer-field", "nope", math)
    assert result.exit_code == 2
    assert "no column `nope` for the answer" in result.output
