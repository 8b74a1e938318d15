import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from cord.common.keys import Keys, listening
from cord.common.metrics import free_port
from cord.coordinator.cli import main
from tests.conftest import base_config, wait_for, write_config
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


# -- a newcomer's first hour ----------------------------------------------------------


def _cord_coord(*args: object, **kw):
    """`cord-coord` in a process of its own (signals, stdout and stderr apart)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cord.coordinator.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.timeout(180)
def test_run_without_workers_says_what_it_waits_for_and_ctrl_c_hands_back(
    make_config, tmp_path, redis_client, namespace
):
    # No worker serves any pool: the run says so, with the commands that start them, and
    # where it writes; Ctrl-C prints the summary and how to resume, exit 130, and the
    # problem is handed back for the next run.
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "p1", "question": "1 + 2", "answer": "3"}\n')
    assert run("enqueue", "--config", config, path).exit_code == 0
    out = tmp_path / "out"
    proc = _cord_coord("run", "--config", config, "--out", out, "--no-progress")
    lines: list[str] = []
    assert proc.stderr is not None

    def waited() -> bool:
        lines.append(proc.stderr.readline())
        return '"waiting_for_workers"' in lines[-1]

    wait_for(waited, 60, "the run to say it waits for workers")
    note = json.loads(lines[-1])
    assert note["pools"] == ["alpha", "beta", "gamma", "meta"]
    assert f"cord-worker --config {config} --pool alpha" in note["start"]
    writing = [json.loads(x) for x in lines if '"writing"' in x]
    assert writing and writing[0]["traces_file"] == str(out / "traces.jsonl")
    status = json.loads(run("status", "--config", config, "--json").output)
    assert len(status["coordinators"]) == 1 and list(status["coordinators"].values()) == [1]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["done"] == 0 and summary["traces_file"] == str(out / "traces.jsonl")
    assert f"run `cord-coord run --config {config} --out {out}` again to resume" in stderr
    assert "1 problem(s) left" in stderr and "Traceback" not in stderr
    after = json.loads(run("status", "--config", config, "--json").output)
    assert after["coordinators"] == {} and after["orphaned"] == 1
    text = run("status", "--config", config).output
    assert "coordinators running: none" in text
    assert "ETA: none while no coordinator runs" in text


def test_an_unreachable_redis_is_one_line_and_debug_shows_the_traceback(make_config, tmp_path):
    config, _ = make_config()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "CORD_REDIS_URL": dead}
    env.pop("CORD_DEBUG", None)
    for verb in (["status"], ["enqueue", str(tmp_path / "none.jsonl")]):
        if verb[0] == "enqueue":
            (tmp_path / "none.jsonl").write_text('{"question": "q", "answer": "1"}\n')
        proc = _cord_coord(verb[0], "--config", config, *verb[1:], env=env)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("Error: cannot reach Redis (") and "CORD_REDIS_URL" in last
    proc = _cord_coord("--debug", "status", "--config", config, env=env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" in stderr and "ConnectionError" in stderr


def test_reset_clears_the_namespace_after_asking_and_known_ids_say_how(
    make_config, tmp_path, redis_client, namespace
):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "question": "q", "answer": "1"}\n')
    run("enqueue", "--config", config, path)
    again = CliRunner().invoke(main, ["enqueue", "--config", str(config), str(path)])
    assert "enqueued 0 new problem(s); 1 already known" in again.stdout
    assert f"cord-coord reset --config {config} --rows" in again.stderr
    out = tmp_path / "out"
    out.mkdir()
    (out / "traces.jsonl").write_text("")
    # A coordinator listening on the namespace: refused (exit 2) unless --force.
    redis_client.set(listening(Keys(namespace).replies("other")), "other-coordinator", ex=60)
    refused = CliRunner().invoke(main, ["reset", "--config", str(config), "--yes"])
    assert refused.exit_code == 2 and "other-coordinator" in refused.output
    redis_client.delete(listening(Keys(namespace).replies("other")))
    # Asked first: "n" keeps everything.
    kept = CliRunner().invoke(main, ["reset", "--config", str(config)], input="n\n")
    assert kept.exit_code == 1 and redis_client.hlen(Keys(namespace).problems) == 1
    done = run("reset", "--config", config, "--out", out, "--rows", "--yes")
    assert done.exit_code == 0 and f"deleted {out / 'traces.jsonl'}" in done.output
    assert redis_client.hlen(Keys(namespace).problems) == 0 and not (out / "traces.jsonl").exists()
    fresh = run("enqueue", "--config", config, path)
    assert "enqueued 1 new problem(s); 0 already known" in fresh.output


def test_one_cli_style(make_config, tmp_path):
    config, _ = make_config()
    assert "version" in run("--version").output
    assert run("status", "--config", config, "--log-level", "debug").exit_code == 0
    bad = CliRunner().invoke(main, ["status", "--config", str(config), "--log-level", "loud"])
    assert bad.exit_code == 2
    out = tmp_path / "x.jsonl"
    score = CliRunner().invoke(
        main, ["export", "--in", str(tmp_path), "--out", str(out), "--min-score", "2"]
    )
    assert score.exit_code == 2 and "0<=x<=1" in score.output.replace(" ", "")
    both = CliRunner().invoke(
        main, ["eval", "--config", str(config), "a.jsonl", "--problems", "b.jsonl"]
    )
    assert both.exit_code == 2 and "give the problems once" in both.output


def test_integer_answers_are_enqueued_as_text_only_on_request(
    make_config, tmp_path, redis_client, namespace
):
    config, _ = make_config()
    path = tmp_path / "aime.jsonl"
    path.write_text('{"id": "a1", "question": "q", "answer": 204}\n')
    refused = run("enqueue", "--config", config, path)
    assert refused.exit_code == 2 and "or pass --answers-as-text" in refused.output
    taken = run("enqueue", "--config", config, "--answers-as-text", path)
    assert taken.exit_code == 0 and "enqueued 1 new problem(s)" in taken.output
    stored = json.loads(redis_client.hget(Keys(namespace).problems, "a1"))
    assert stored["answer"] == "204"


@pytest.mark.redis
@pytest.mark.slow
def test_enqueue_on_a_sentinel_url_waits_for_the_replica(sentinel_group, tmp_path, namespace):
    """The problems are the one write cord cannot rebuild: enqueue returns once a replica
    holds them too, so a failover right after loses none."""
    data = base_config(sentinel_group.url, namespace)
    config = write_config(tmp_path / "run.yaml", data)
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n')
    result = run("enqueue", "--config", config, path)
    assert result.exit_code == 0, result.output
    assert "enqueued 1 new problem(s)" in result.output
    assert "confirmed by 1 of 1 replica(s)" in result.output
    (replica,) = set(sentinel_group.data_ports) - {sentinel_group.primary_port()}
    held = redis.Redis.from_url(sentinel_group.node_url(replica)).hget(f"{namespace}:problems", "a")
    assert held is not None


@pytest.mark.slow
def test_redis_up_replica_starts_a_primary_its_replica_and_sentinels(tmp_path):
    """`redis-up` on a Sentinel URL, in the foreground as a Procfile runs it: the URL
    answers, the primary has its replica, and SIGTERM stops all five processes."""
    from cord.coordinator.redis_server import ping

    ports = [free_port() for _ in range(5)]
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports[2:]) + "/try/0"
    refused = run("redis-up", "--replica", "--url", "redis://127.0.0.1:1/0")
    assert refused.exit_code == 2 and "needs a redis+sentinel:// URL" in refused.output
    argv = [sys.executable, "-m", "cord.coordinator.cli", "redis-up", "--url", url]
    argv += ["--foreground", "--data-ports", f"{ports[0]},{ports[1]}", "--dir", str(tmp_path)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "started a primary" in proc.stdout.readline()  # once the group is ready
        assert ping(url)
        primary = redis.Redis(port=ports[0]).info("replication")
        assert primary["role"] == "master" and primary["connected_slaves"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert not any(ping(f"redis://127.0.0.1:{p}/0", timeout=0.2) for p in ports[:2])
