"""The sim's calibration on the real CPU servers (ops/bench/calibrate.py): the fits that
turn a run's rows into the sim's draws give back what they were fitted to."""

from __future__ import annotations

import math
import random
import sys

from cord.common.config import RunConfig
from tests.ops.bench.test_bench import BENCH, load

sys.path.insert(0, str(BENCH))  # the benchmarks import each other as scripts do
calibrate = load("calibrate")


def test_a_uniform_fit_keeps_the_mean_and_the_spread():
    rng = random.Random(3)
    values = [rng.uniform(4, 20) for _ in range(20_000)]
    lo, hi = calibrate.uniform_fit(values)
    assert abs(lo - 4) <= 1 and abs(hi - 20) <= 1
    assert calibrate.uniform_fit([7, 7, 7]) == (7, 7)


def test_a_log_uniform_fit_keeps_the_median_and_the_mean():
    rng = random.Random(5)
    values = [30 * math.exp(rng.random() * math.log(8)) for _ in range(50_000)]
    lo, hi = calibrate.log_uniform_fit(values)
    assert abs(lo - 30) <= 1 and abs(hi - 240) <= 4
    # A mean at or below the median leaves no room for a long tail: the median alone.
    assert calibrate.log_uniform_fit([10, 50, 50, 52]) == (50, 50)


def test_the_agreeing_share_gives_back_the_scores_it_was_read_from():
    for q in (0.0, 0.3, 0.57, 1.0):
        needed = (1 - (1 - q) ** 3) / 3 + (1 - q)
        assert math.isclose(calibrate.agreeing_share(needed, 3), q, abs_tol=1e-6)
    assert calibrate.agreeing_share(1.0, 3) < 1e-6


def test_the_sim_fleet_is_fed_as_the_real_workers_feed_their_servers():
    """Every sim pool runs the real pool's tasks at once and items per task: the batches
    a server sees are what decide its passes (with the sim's own default of 64 tasks at
    once, it batched curation's whole trajectories 144 at a time where the real servers
    saw 64, and priced them a third under the servers' CPU time)."""
    harness = load("harness")
    data = harness.fleet_dict("redis://127.0.0.1:1/0", "calibrate-test", engine="vllm")
    data["teachers"][0]["concurrency"] = 3
    cfg = RunConfig.model_validate(data)
    names = [*cfg.teacher_names, cfg.meta_prover.name]
    cost = {"decode_s": [0.002, 5e-5, 2e-7], "prefill_token_s": 2e-5, "request_s": 0.003}
    sim = RunConfig.model_validate(
        calibrate.sim_dict(
            cfg,
            data,
            {name: dict(cost) for name in names},
            {name: {"prompt_tokens": [40, 60]} for name in names},
            dict.fromkeys(names, 65536),
        )
    )
    for name in names:
        real, mine = cfg.pool(name), sim.pool(name)
        assert mine.engine == "sim"
        assert (mine.task_slots, mine.max_batch) == (real.task_slots, real.max_batch)
    assert sim.pool(names[0]).task_slots == 3
    assert sim.meta_prover.max_batch == 32  # the meta-prover's own default, as in the real fleet
