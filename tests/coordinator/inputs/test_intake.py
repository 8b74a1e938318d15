"""`cord-coord enqueue` on files larger than one chunk of the streaming check: errors
far apart (a duplicate id in another chunk than its first line), --skip-invalid's
rejects, the cap on printed errors, and the enqueue process's peak memory."""

import json
import sys

import pytest
from click.testing import CliRunner

from cord.common.config import load_config
from cord.coordinator.cli import main
from cord.coordinator.inputs import intake
from cord.coordinator.inputs.problems import Problem
from tests.ops.bench.test_bench import load

pytestmark = pytest.mark.redis


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def row(i: int) -> dict:
    return {"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}


def write_lines(path, n: int, bad: dict[int, str]) -> None:
    """`n` lines of valid problems p1..pn, with line numbers in `bad` replaced."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, n + 1):
            f.write(bad.get(i, json.dumps(row(i))) + "\n")


# Over two chunks of the check: the duplicate's first line is in the first chunk.
FAR = 2 * intake.CHUNK_LINES + 500
DUP_LINE, BAD_LINE = FAR - 10, intake.CHUNK_LINES // 2


def test_duplicate_and_bad_line_far_apart_enqueue_nothing(
    make_config, tmp_path, redis_client, namespace
):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    write_lines(path, FAR, {BAD_LINE: '{"question": "q"}', DUP_LINE: json.dumps(row(3))})
    result = run("enqueue", "--config", config, path)
    assert result.exit_code == 2
    assert f"line {BAD_LINE}, field `answer`: missing; add a `answer` string" in result.output
    assert f"line {DUP_LINE}, field `id`: duplicate id 'p3' (first on line 3)" in result.output
    assert "2 bad line(s); nothing enqueued" in result.output
    assert redis_client.hlen(f"{namespace}:problems") == 0
    assert redis_client.llen(f"{namespace}:queue") == 0
    assert not (tmp_path / "p.jsonl.rejected.jsonl").exists()


def test_skip_invalid_enqueues_exactly_the_valid_ones(
    make_config, tmp_path, redis_client, namespace
):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    bad = {BAD_LINE: '{"question": "q"}', DUP_LINE: json.dumps(row(3)), 7: "[1]"}
    write_lines(path, FAR, bad)
    # The last line: truncated (no newline), after the duplicate.
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "last", "question": "q", "ans')
    result = run("enqueue", "--config", config, "--skip-invalid", path)
    assert result.exit_code == 0, result.output
    valid = [i for i in range(1, FAR + 1) if i not in bad]
    assert f"enqueued {len(valid)} new problem(s); 0 already known" in result.output
    assert f"4 bad line(s) written to {path}.rejected.jsonl" in result.output
    ids = [f"p{i}".encode() for i in valid]
    assert redis_client.lrange(f"{namespace}:queue", 0, -1) == ids
    stored = redis_client.hmget(f"{namespace}:problems", [ids[0], ids[-1]])
    assert stored == [
        Problem(**row(valid[0])).model_dump_json().encode(),
        Problem(**row(valid[-1])).model_dump_json().encode(),
    ]
    lines = (tmp_path / "p.jsonl.rejected.jsonl").read_text(encoding="utf-8").splitlines()
    rejects = [json.loads(x) for x in lines]
    assert [(r["line"], r["field"]) for r in rejects] == [
        (7, None),
        (BAD_LINE, "answer"),
        (DUP_LINE, "id"),
        (FAR + 1, None),
    ]
    assert rejects[0]["raw"] == "[1]" and "not an object" in rejects[0]["error"]
    assert rejects[1] == {
        "line": BAD_LINE,
        "field": "answer",
        "error": "missing",
        "fix": "add a `answer` string, or name the field that holds it with --answer-field",
        "raw": '{"question": "q"}',
    }
    assert rejects[2]["error"] == "duplicate id 'p3' (first on line 3)"
    assert rejects[2]["raw"] == json.dumps(row(3))
    assert rejects[3]["error"].startswith("truncated last line")
    again = run("enqueue", "--config", config, "--skip-invalid", path)
    assert f"enqueued 0 new problem(s); {len(valid)} already known" in again.output
    assert redis_client.llen(f"{namespace}:queue") == len(valid)


def test_errors_beyond_the_first_are_counted(make_config, tmp_path, redis_client, namespace):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    many = intake.ERRORS_KEPT + 30
    write_lines(path, 2 * many, {2 * i: "nope" for i in range(1, many + 1)})
    report = intake.enqueue_file(load_config(config), path)
    assert report.error_count == many and len(report.errors) == intake.ERRORS_KEPT
    assert report.errors[-1].line == 2 * intake.ERRORS_KEPT  # the first ones, in order
    result = run("enqueue", "--config", config, path)
    assert result.exit_code == 2
    assert "... and 30 more bad line(s)" in result.output
    assert f"{many} bad line(s); nothing enqueued" in result.output
    result = run("enqueue", "--config", config, "--skip-invalid", path)
    assert f"... and 30 more bad line(s) (all are in {path}.rejected.jsonl)" in result.output
    assert len((tmp_path / "p.jsonl.rejected.jsonl").read_text().splitlines()) == many
    assert redis_client.llen(f"{namespace}:queue") == many


def test_empty_file_is_an_error(make_config, tmp_path, redis_client, namespace):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    path.write_text("\n  \n")
    result = run("enqueue", "--config", config, path)
    assert result.exit_code == 2
    assert "line 0: the file is empty" in result.output
    assert redis_client.hlen(f"{namespace}:problems") == 0


# Peak RSS of `cord-coord enqueue` on this test's 200,000 problems (14 MB): 258 MiB
# when it held the file (every line and every Problem), 69 MiB streaming. The
# interpreter with its imports is about 55 MiB; the id index's page cache may add up to
# 32 MiB on a larger file (a 1M-problem file peaks at 97 MiB).
ENQUEUE_RSS_BOUND_MIB = 160


@pytest.mark.slow
def test_enqueue_does_not_hold_the_file(make_config, tmp_path, redis_client, namespace):
    config, _ = make_config()
    path = tmp_path / "p.jsonl"
    n = 200_000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(row(i)) + "\n")
    # The child's own peak (VmHWM, watched while it runs: ru_maxrss would count the
    # test process's RSS it had between fork and exec).
    cmd = [sys.executable, "-m", "cord.coordinator.cli", "enqueue", "--config", str(config)]
    status, output, _, peak_mib = load("harness").run_watched([*cmd, str(path)])
    assert status == 0, output
    assert f"enqueued {n} new problem(s)" in output
    assert redis_client.llen(f"{namespace}:queue") == n
    assert peak_mib < ENQUEUE_RSS_BOUND_MIB, f"peak RSS {peak_mib:.0f} MiB"
