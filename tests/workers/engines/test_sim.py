"""The `sim` engine: a simulated GPU's clock, prefix cache and continuous batch, on its
own (no fleet). Its texts are placeholders; what is checked is what it prices."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cord.common import config as config_module
from cord.common.config import ConfigError, config_from_dict
from cord.common.messages import AnswerItem, ExpandItem, ScoreItem
from cord.common.pools import model_spec
from cord.coordinator.search.base import split_steps
from cord.workers.engines.sim import BlockCache, SimEngine, block_keys, digest, step_tokens
from cord.workers.engines.simcost import CARDS, SHAPES, clock_of, kv_capacity_tokens


def engine(**fields) -> SimEngine:
    spec = {"name": "t", "engine": "sim", "model": "qwen2.5-32b", "time_scale": 0.0005}
    return SimEngine(model_spec(**{**spec, **fields}))


def expand(key: str, steps: list[str], whole: bool = False, prompt: str = "Q1") -> ExpandItem:
    return ExpandItem(
        key=key,
        prompt=prompt,
        steps=steps,
        next_step=len(steps) + 1,
        max_new_tokens=20000,
        temperature=0.6,
        seed=1,
        whole=whole,
    )


def test_the_roofline_of_a_32b_model_on_an_h100():
    h100, shape = CARDS["h100-sxm"], SHAPES["qwen2.5-32b"]
    clock = clock_of("h100-sxm", "qwen2.5-32b")
    # One sequence: the weights (65.6 GB) at the measured 3.0 TB/s, plus its KV.
    kv = 1000 * shape.kv_bytes_per_token
    assert clock.pass_s(1, 1000, 0, 0) == pytest.approx((shape.weight_bytes + kv) / 3.0e12)
    assert shape.kv_bytes_per_token == 256 * 1024  # 64 layers, 8 KV heads of 128, bf16
    # Compute-bound beyond ~500 sequences: 2 x params FLOPs each at 798 TFLOP/s.
    assert clock.pass_s(2000, 0, 0, 0) == pytest.approx(2000 * 2 * 32.8e9 / 798e12)
    assert 40_000 < kv_capacity_tokens(h100, shape) < 70_000
    assert kv_capacity_tokens(CARDS["a10g"], SHAPES["qwen2.5-32b"]) == 0  # does not fit
    with pytest.raises(ValueError, match="unknown card"):
        clock_of("tpu", "qwen2.5-32b")


def test_block_keys_are_shared_exactly_as_far_as_the_tokens_are():
    a = [(1, 40), (2, 30)]
    b = [(1, 40), (3, 30)]
    ka, kb = block_keys(a, 16), block_keys(b, 16)
    assert len(ka) == 70 // 16
    assert ka[:2] == kb[:2] and ka[2:] != kb[2:]  # tokens 0-31 shared; block 2 ends at 48
    assert block_keys([(1, 20), (2, 20)], 16)[0] == block_keys([(1, 40)], 16)[0]
    assert block_keys([(1, 20), (2, 20)], 16)[1] != block_keys([(1, 40)], 16)[1]


def test_the_cache_evicts_least_recent_first_and_remembers_it():
    cache = BlockCache(4)
    cache.pin([1, 2], 0)
    cache.release([1, 2], 0, [3])
    assert list(cache.cached) == [1, 2, 3]
    cache.pin([4, 5], 0)  # 2 pinned + 3 cached > 4: the oldest goes
    assert 1 in cache.evicted and 1 not in cache.cached and cache.hit_blocks([2, 3]) == 2
    assert not cache.fits([6, 7, 8], 0) and cache.fits([6, 7], 0)


def test_a_step_finds_the_prefix_this_server_wrote_cached():
    e = engine()
    first = e.expand([expand("a", [])])[0]
    assert 100 <= first.tokens <= 400 and first.finish == "step"
    assert step_tokens(first.text) == first.tokens
    again = e.expand([expand("b", [first.text])])[0]
    # The question and the step were written here: all but the last partial block hit.
    assert again.prompt_tokens - again.cached_tokens < 16
    other = e.expand([expand("c", [" 999999#250"])])[0]  # a step another teacher wrote
    assert other.prompt_tokens - other.cached_tokens >= 250 - 16


def test_a_whole_trajectory_splits_into_the_steps_the_next_prompts_find_cached():
    e = engine()
    (whole,) = e.expand([expand("w", [], whole=True, prompt="Q2")])
    assert whole.finish == "think_end" and whole.tokens >= 2000 * 0.8
    steps = [s.text for s in split_steps(whole.text, "t", whole.tokens)]
    assert sum(step_tokens(s) for s in steps) == whole.tokens
    (answer,) = e.answer(
        [AnswerItem(key="a", prompt="Q2", steps=steps, max_new_tokens=32, temperature=0, seed=0)]
    )
    assert answer.prompt_tokens - answer.cached_tokens < 32
    (score,) = e.score([ScoreItem(key="s", prompt="Q2", steps=steps, answer="7")])
    assert 0 < score.score < 1 and score.answer_tokens == 10


def test_a_full_cache_preempts_and_recomputes_and_everything_ends():
    e = engine(kv_tokens=6000, trace_tokens=(1000, 2000))
    items = [expand(f"w{i}", [], whole=True, prompt="Q3") for i in range(6)]
    out = e.expand(items)
    assert [g.key for g in out] == [i.key for i in items]
    stats = e.stats()
    assert stats.sim is not None and stats.sim.preemptions > 0
    assert 0 < stats.sim.evicted_prefill_tokens <= stats.sim.prefill_tokens
    assert stats.sim.decode_seq_steps >= sum(g.tokens for g in out)
    assert stats.kv_capacity_tokens == 6000 and stats.requests_waiting == 0


def test_streaming_hands_items_over_as_they_end():
    e = engine()
    handed: list[list[str]] = []
    items = [expand(f"k{i}", [], prompt="Q4") for i in range(8)]
    out = e.expand(items, emit=lambda ready: handed.append([g.key for g in ready]))
    early = [k for group in handed for k in group]
    assert handed and len(set(early)) == len(early) < 8  # the last ones come back at the end
    assert {g.key for g in out} == {i.key for i in items}
    ends = {g.key: g.tokens for g in out}
    assert max(ends[k] for k in early) <= min(ends[k] for k in ends if k not in early)


def test_per_token_scoring_prefills_each_prompts_last_partial_block_as_vllm_does():
    # One prompt per answer position j, context + answer[:j], in one request: the first
    # computes the context; each other finds the full blocks cached and computes the rest.
    n, block = 6, 32
    e = engine(
        score_passes="per_token", block_tokens=block, answer_tokens=n, prompt_tokens=(100, 100)
    )
    (one,) = engine(block_tokens=block, answer_tokens=n, prompt_tokens=(100, 100)).score(
        [ScoreItem(key="s", prompt="Q5", steps=[" 1#50"], answer="7")]
    )
    (per,) = e.score([ScoreItem(key="s", prompt="Q5", steps=[" 1#50"], answer="7")])
    assert per.score == one.score and one.prompt_tokens == 150 + n
    lengths = [150 + j for j in range(n)]
    assert per.prompt_tokens == sum(lengths)
    computed = lengths[0] + sum(t - (t // block) * block for t in lengths[1:])
    assert per.prompt_tokens - per.cached_tokens == computed
    assert e.stats().requests == 1


def test_candidates_that_agree_write_the_same_step_and_others_their_own():
    agree = engine(same_step_share=1.0)
    a, b = agree.expand([expand("a", [" 1#50"]), expand("b", [" 1#50"])])
    assert a.text == b.text and a.tokens == b.tokens and a.finish == b.finish
    (c,) = agree.expand([expand("c", [" 2#50"])])  # another trajectory: another step
    assert c.text != a.text
    apart = engine()
    d, e = apart.expand([expand("a", [" 1#50"]), expand("b", [" 1#50"])])
    assert d.text != e.text


def test_a_burner_spends_the_cpu_time_a_pass_costs():
    e = engine(
        model="alpha",
        time_scale=1.0,
        decode_s=(0.004, 0.0),
        prefill_token_s=0.0,
        burn_cpu=True,
        step_tokens=(20, 20),
    )
    burner = e.server.burner
    assert burner is not None
    before = _cpu_s(burner.proc.pid)
    (g,) = e.expand([expand("b", [])])
    assert g.tokens == 20
    # The prefill writes the first token, 19 decode passes of 4 ms each the rest, spun
    # in the burner's process.
    assert _cpu_s(burner.proc.pid) - before >= 0.9 * 19 * 0.004
    burner.close()


def test_the_clock_leaves_out_the_time_its_thread_noticed_a_pass_late():
    # One request of 20 tokens, its passes 10 ms each at scale 1: ~0.2 s of work. The
    # test holds the server's lock for 0.4 s meanwhile, as a busy host's other threads
    # would: the passes end late, and the clock does not count the lateness.
    e = engine(
        model="alpha",
        time_scale=1.0,
        decode_s=(0.01, 0.0),
        prefill_token_s=0.0,
        step_tokens=(20, 20),
    )
    server = e.server
    start = time.perf_counter() - server._real0
    done = threading.Thread(target=e.expand, args=([expand("late", [])],))
    done.start()
    time.sleep(0.05)
    with server._cv:
        time.sleep(0.4)
    done.join()
    sim = server.snapshot()
    elapsed = time.perf_counter() - server._real0
    assert sim.lag_s >= 0.2  # the passes ended ~0.25 s late
    assert sim.busy_s == pytest.approx(0.2, abs=0.02)  # the work itself, as priced
    # The clock ran with real time, less the lateness, to the millisecond.
    assert sim.clock_s == pytest.approx(elapsed - sim.lag_s, abs=0.01)
    assert sim.clock_s - start < elapsed - start - 0.2


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_config_refuses_the_sim_engine_outside_the_harness(monkeypatch):
    pool = {"engine": "sim", "model": "qwen2.5-7b"}
    data = {"teachers": [{"name": "a", **pool}], "meta_prover": {"name": "m", **pool}}
    with pytest.raises(ConfigError, match="engine: sim"):
        config_from_dict(data)
    monkeypatch.setattr(config_module, "_bench_engine_allowed", True)
    assert config_from_dict(data).pool("a").continuous_batching


def test_digest_is_stable():
    assert digest("a", 1) == digest("a", 1) != digest("a", 2)
