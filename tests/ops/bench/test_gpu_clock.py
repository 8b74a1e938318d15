"""The GPU clock check (ops/bench/gpu_clock.py): its model shapes are the ones the sim
prices, and the whole pipeline runs on a CPU with a tiny shape (its figures are of no
use there: only that every one is printed and computed as stated)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cord.workers.engines.simcost import SHAPES, Card, Roofline
from tests.ops.bench.test_bench import load


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_the_models_it_builds_have_the_shapes_the_sim_prices(name):
    clock = load("gpu_clock")
    model, params = clock.build(name, torch.device("meta"))
    assert clock.shape_of(name, model, params) == SHAPES[name]


def test_a_tiny_run_prints_each_figure_against_the_roofline_of_the_card_it_measured(tmp_path):
    clock = load("gpu_clock")
    args = ["--shape", "tiny", "--device", "cpu", "--context", "32", "--batches", "1,4"]
    args += ["--prefill-tokens", "64", "--repeats", "2", "--json", str(tmp_path / "f.json")]
    done = CliRunner().invoke(clock.main, args)
    assert done.exit_code == 0, done.output
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    model, params = clock.build("tiny", torch.device("meta"))
    card = Card(
        "here",
        float(values["clock_card_bandwidth_tb_s"]) * 1e12,
        float(values["clock_card_bf16_tflop_s"]) * 1e12,
        0,
        0,
        0,
        "",
    )
    roofline = Roofline(card, clock.shape_of("tiny", model, params))
    for b in (1, 4):
        measured = float(values[f"clock_decode_s_b{b}"])
        predicted = float(values[f"clock_decode_pred_s_b{b}"])
        assert measured > 0
        assert predicted == pytest.approx(roofline.pass_s(b, b * 32, 0, 0), rel=1e-2)
        error = abs(predicted - measured) / measured
        assert float(values[f"clock_decode_error_b{b}"]) == pytest.approx(error, abs=2e-3)
    assert float(values["clock_prefill_tokens_per_s"]) > 0
    assert "clock_decode_pred_sim_s_b1" not in values  # a CPU is none of the sim's cards
    assert (tmp_path / "f.json").exists()
