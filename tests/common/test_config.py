from pathlib import Path

import pytest

from cord.common.config import ConfigError, config_from_dict, load_config
from cord.common.pools import VLLMSpec
from cord.common.redisconn import redact_url

ROOT = Path(__file__).resolve().parents[2]


def minimal(**extra):
    return {
        "teachers": [{"name": "a", "model": "m/a"}, {"name": "b", "model": "m/b"}],
        "meta_prover": {"name": "judge", "model": "m/j"},
        **extra,
    }


def test_demo_config_loads_and_resolves_model_paths():
    cfg = load_config(ROOT / "examples" / "demo.yaml")
    assert cfg.teacher_names == ["alpha", "beta", "gamma"]
    assert cfg.model_names == ["alpha", "beta", "gamma", "meta"]
    assert Path(cfg.teacher("alpha").model) == ROOT / "models" / "alpha"
    assert cfg.pool("meta").model == str(ROOT / "models" / "meta")


def test_defaults_follow_the_paper():
    s = config_from_dict(minimal()).search
    assert (s.strategy, s.beam_width, s.samples_per_beam, s.temperature) == ("cord", 4, 1, 0.6)
    assert (s.thinking_budget, s.answer_budget) == (16384, 4096)


def test_meta_prover_may_name_a_teacher():
    cfg = config_from_dict(minimal(meta_prover={"name": "b"}))
    assert cfg.model_names == ["a", "b"]
    assert cfg.pool("b").model == "m/b"


def test_meta_prover_without_model_must_name_a_teacher():
    with pytest.raises(ConfigError, match=r"meta_prover: give `model`"):
        config_from_dict(minimal(meta_prover={"name": "nobody"}))


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"search": {"beam_width": 0}}, "search.beam_width", "greater than or equal to 1"),
        ({"search": {"beem_width": 2}}, "search.beem_width", "unknown field"),
        ({"teachers": []}, "teachers", "at least 1"),
        (
            {"teachers": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]},
            "teachers",
            "unique",
        ),
        ({"teachers": [{"name": "bad name", "model": "x"}]}, "teachers.0.name", "pattern"),
        ({"eval": {"match": "fuzzy"}}, "eval.match", "Input should be 'math' or 'exact'"),
        ({"eval": {"mach": "exact"}}, "eval.mach", "unknown field"),
    ],
)
def test_errors_name_the_field(patch, field, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict({**minimal(), **patch}, source="run.yaml")
    text = str(err.value)
    assert text.startswith("run.yaml: invalid run config")
    assert any(line.strip().startswith(field) and words in line for line in text.splitlines()), text


def test_missing_meta_prover_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teachers:\n  - {name: a, model: x}\n")
    with pytest.raises(ConfigError, match="meta_prover: required field is missing"):
        load_config(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


def test_env_overrides_redis_url(monkeypatch):
    monkeypatch.setenv("CORD_REDIS_URL", "redis://elsewhere:6380/2")
    monkeypatch.setenv("CORD_NAMESPACE", "run7")
    cfg = config_from_dict(minimal(redis_url="redis://127.0.0.1:6379/0"))
    assert cfg.redis_url == "redis://elsewhere:6380/2"
    assert cfg.namespace == "run7"


def test_redact_url_hides_password():
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:pw@h/1") == "rediss://user:***@h/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_each_engine_has_its_own_fields():
    with pytest.raises(ConfigError, match=r"teachers\.0\.vllm_url: unknown field of engine hf"):
        config_from_dict(minimal(teachers=[{"name": "a", "model": "x", "vllm_url": "http://h:1"}]))
    with pytest.raises(ConfigError, match=r"meta_prover: unknown engine; use one of hf, sglang"):
        config_from_dict(minimal(meta_prover={"name": "j", "model": "m", "engine": "tgi"}))
    pool = {"name": "a", "model": "x", "engine": "vllm", "vllm_url": "http://h:1"}
    cfg = config_from_dict(minimal(teachers=[{**pool, "max_model_len": 2048}]))
    spec = cfg.pool("a")
    assert isinstance(spec, VLLMSpec) and spec.server_url == "http://h:1"
    assert (spec.max_model_len, spec.launch[-1]) == (2048, "vllm.entrypoints.openai.api_server")
    with pytest.raises(
        ConfigError, match=r"teachers\.0\.sglang_args: unknown field of engine vllm"
    ):
        config_from_dict(minimal(teachers=[{**pool, "sglang_args": []}]))


def test_eval_match_is_math_unless_told(tmp_path):
    assert config_from_dict(minimal()).eval.match == "math"
    path = tmp_path / "run.yaml"
    path.write_text(
        "teachers: [{name: a, model: m/a}]\nmeta_prover: {name: a}\neval: {match: exact}\n"
    )
    assert load_config(path, resolve_models=False).eval.match == "exact"
    with pytest.raises(ConfigError, match=r"eval\.match: Input should be 'math' or 'exact'"):
        config_from_dict(minimal(), overrides={"eval.match": "substring"})


def test_meta_prover_scores_32_items_a_task_unless_told():
    cfg = config_from_dict(minimal())
    assert (cfg.pool("a").max_batch, cfg.pool("judge").max_batch) == (16, 32)
    told = config_from_dict(minimal(meta_prover={"name": "judge", "model": "m", "max_batch": 8}))
    assert told.pool("judge").max_batch == 8
    with pytest.raises(ConfigError, match=r"teachers\.0\.model: required field is missing"):
        config_from_dict(minimal(teachers=[{"name": "a"}]))
