import json

import pytest
from click.testing import CliRunner

from cord.coordinator.cli import main

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
            "fix": "add a `answer` string",
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


def test_lab_problems_are_deterministic():
    a = run("lab-problems", "--n", 3, "--seed", 5).output
    assert a == run("lab-problems", "--n", 3, "--seed", 5).output
    rows = [json.loads(x) for x in a.splitlines()]
    assert [r["id"] for r in rows] == ["arith-5-0", "arith-5-1", "arith-5-2"]
    assert all(str(eval(r["question"][8:-1])) == r["answer"] for r in rows)
