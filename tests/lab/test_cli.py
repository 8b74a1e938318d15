"""`cord-lab problems`: the lab's problems, the same for the same seed."""

import json

from click.testing import CliRunner

from cord.lab.cli import main


def test_lab_problems_are_deterministic():
    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    a = run("problems", "--n", 3, "--seed", 5)
    assert a == run("problems", "--n", 3, "--seed", 5)
    rows = [json.loads(x) for x in a.splitlines()]
    assert [r["id"] for r in rows] == ["arith-5-0", "arith-5-1", "arith-5-2"]
    assert all(str(eval(r["question"][8:-1])) == r["answer"] for r in rows)
