"""The `bench` engine: placeholder text at once, a search that ends after its steps, and a
run config that refuses it everywhere but the benchmark harness."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cord.common import config as config_module
from cord.common.config import ConfigError, config_from_dict
from cord.common.messages import AnswerItem, ExpandItem, ScoreItem
from cord.common.pools import model_spec
from cord.workers.engines import load_engine
from cord.workers.engines.bench import BenchEngine, parse_options
from tests.conftest import write_config


def bench_config(namespace: str = "bench-test") -> dict:
    pool = {"engine": "bench", "model": "steps=3,tokens=5"}
    return {
        "namespace": namespace,
        "teachers": [{"name": "a", **pool}, {"name": "b", **pool}],
        "meta_prover": {"name": "m", **pool},
    }


def expand(step: int, key: str = "p:x:1:0:a:0", whole: bool = False) -> ExpandItem:
    return ExpandItem(
        key=key,
        prompt="q",
        steps=[f"### Step {i}. s" for i in range(1, step)],
        next_step=step,
        max_new_tokens=100,
        temperature=0.6,
        seed=1,
        whole=whole,
    )


def test_steps_end_the_trajectory_and_texts_differ_per_key():
    engine = BenchEngine(model_spec(name="a", engine="bench", model="steps=3,tokens=5"))
    first, last = engine.expand([expand(1), expand(3)])
    assert (first.finish, last.finish) == ("step", "think_end")
    assert first.tokens == last.tokens == 5 and first.text.strip()
    (other,) = engine.expand([expand(1, key="p:x:1:0:b:0")])
    assert other.text != first.text
    (whole,) = engine.expand([expand(1, whole=True)])
    assert whole.finish == "think_end" and whole.text.count("### Step") == 2
    assert whole.tokens == 15


def test_scores_are_deterministic_and_answers_fixed():
    engine = load_engine(model_spec(name="m", engine="bench", model=""))
    items = [
        ScoreItem(key=f"k{i}", prompt="q", steps=["### Step 1. s"], answer="7") for i in range(5)
    ]
    once, again = engine.score(items), engine.score(items)
    assert [s.score for s in once] == [s.score for s in again]
    assert all(0.0 < s.score < 1.0 for s in once) and len({s.score for s in once}) == 5
    (answer,) = engine.answer(
        [AnswerItem(key="a", prompt="q", steps=[], max_new_tokens=4, temperature=0.0, seed=0)]
    )
    assert answer.finish == "eos" and answer.tokens == 4
    assert engine.stats().requests == 11


def test_bad_options_are_refused():
    assert parse_options("bench") == {"steps": 4, "tokens": 8, "ms": 0}
    assert parse_options("steps=2,ms=0")["ms"] == 0
    for bad in ("steps=0", "steps=x", "depth=3", "steps", "ms=-1"):
        with pytest.raises(ValueError, match="bench engine"):
            parse_options(bad)


def test_config_refuses_the_bench_engine_outside_the_harness(monkeypatch):
    with pytest.raises(ConfigError, match="only under the benchmark harness"):
        config_from_dict(bench_config())
    monkeypatch.setattr(config_module, "_bench_engine_allowed", True)
    cfg = config_from_dict(bench_config())
    assert cfg.pool("m").engine == "bench"


def test_cord_coord_and_cord_worker_refuse_it(tmp_path: Path):
    from cord.coordinator.cli import main as coord_main
    from cord.workers.cli import main as worker_main

    path = write_config(tmp_path / "bench.yaml", bench_config())
    for args in (["run", "--config", path], ["eval", "--config", path, "--problems", path]):
        result = CliRunner().invoke(coord_main, list(map(str, args)))
        assert result.exit_code == 2 and "engine: bench" in result.output, result.output
    result = CliRunner().invoke(worker_main, ["--config", str(path), "--pool", "a"])
    assert result.exit_code == 2 and "engine: bench" in result.output, result.output
