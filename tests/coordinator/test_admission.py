"""Admission by the pools' KV caches (`KVAdmission`): what fits, what the heartbeats
say, and what finished problems teach."""

from __future__ import annotations

from cord.common.config import HOLD_S, SchedulingSpec, config_from_dict
from cord.common.messages import Generation
from cord.coordinator.admission import TARGET, KVAdmission
from cord.coordinator.routing import PoolKV
from tests.conftest import base_config


def admission(**fields) -> KVAdmission:
    data = base_config("redis://127.0.0.1:1/0", "adm", beam_width=4, thinking_budget=1000)
    return KVAdmission(config_from_dict({**data, "max_in_flight": 64, **fields}))


def pools(capacity: int, used: int = 0, running: int = 0, waiting: int = 0) -> dict:
    kv = PoolKV(capacity, used, running, waiting)
    return {"alpha": kv, "beta": kv, "gamma": kv}


def test_the_ceiling_rules_until_a_pool_reports_its_cache():
    adm = admission()
    assert adm.room() == 64
    adm.update({}, 0)
    assert adm.room() == 64
    adm.update({"meta": PoolKV(10, 0, 0, 0)}, 0)  # a meta-prover of its own does not steer
    assert adm.room() == 64


def test_the_first_limit_is_what_fits_at_half_the_budget():
    adm = admission()
    adm.update(pools(100_000), 0)
    # 4 beams x (256 + 500) tokens a problem, TARGET x capacity in all.
    assert adm.room() == int(TARGET * 100_000 / (4 * 756))
    adm.update(pools(1000), 0)
    assert adm.room() == 1  # always one


def test_waiting_sequences_stop_admission_and_a_low_duty_widens_it():
    adm = admission()
    adm.update(pools(100_000), 0)
    first = adm.room()
    adm.update(pools(100_000, used=95_000, running=10, waiting=5), 20)
    assert adm.room() <= 20  # sequences queue for room: no more than in flight now
    queued = admission()
    queued.update(pools(100_000, used=10_000, running=10, waiting=5), 1)
    assert queued.room() > 1  # waiting with room to spare (a token budget): not a stop
    busy = admission()
    idle = admission()
    for _ in range(20):
        busy.update(pools(100_000, running=4 * 30), 30)  # every sequence runs
        idle.update(pools(100_000, running=30), 30)  # a quarter of them run
    assert busy.room() <= first < idle.room() <= 64


def test_finished_problems_teach_the_context():
    adm = admission()
    adm.update(pools(100_000), 0)
    before = adm.room()
    for i in range(30):
        pid = f"p{i}"
        adm.observe(pid, "alpha", Generation(key="k", tokens=100, prompt_tokens=50))
        adm.observe(pid, "meta", Generation(key="s", tokens=1, prompt_tokens=99_999))  # no teacher
        adm.finished(pid)
    adm.update(pools(100_000), 0)
    assert adm.context < 150 and adm.room() > before


def test_a_pool_that_batches_continuously_gets_no_hold():
    assert SchedulingSpec().hold_of(True) == 0.0
    assert SchedulingSpec().hold_of(False) == HOLD_S
    assert SchedulingSpec(hold_s=0.05).hold_of(True) == 0.05
