"""The sim engine's GPU clock against a real card: one prepared check.

The GPU projection (costs.py) prices work with a roofline (`simcost.Roofline`): a decode
pass reads the weights and the batch's KV once and does 2 x params FLOPs per sequence; a
prefill does 2 x params FLOPs per token plus attention. This script puts that clock
beside a card it runs on:

1. the card's own bandwidth (a device-to-device copy) and bf16 matrix throughput (a
   square matrix product), the two figures the roofline takes from a card;
2. a random-weight model of a real shape (built from its config, nothing downloaded;
   `--shape`, default Qwen2.5-7B) in bf16: the time of one decode pass at batch 1 to 64,
   each sequence holding `--context` tokens, and prefill tokens per second;
3. the roofline's prediction for each, with the card as measured in 1 and, where the
   card is one of `simcost.CARDS`, with the constants the sim uses; the error of each.

It runs the model as the `hf` engine does (transformers, eager, SDPA attention, a
dynamic KV cache), which no serving engine matches: no CUDA graphs, no fused kernels, so
small batches pay Python's launch overhead the roofline leaves out. The error at batch 1
is that overhead; at larger batches, the roofline's.

    python ops/bench/gpu_clock.py --json /tmp/clock.json     # ~3 min on an H100
    python ops/bench/gpu_clock.py --shape tiny --device cpu  # the pipeline, on a CPU

Prints name=value lines last: `clock_decode_s_b<B>`, `clock_decode_pred_s_b<B>`,
`clock_decode_error_b<B>`, `clock_prefill_tokens_per_s`, its prediction and error,
`clock_decode_error_max`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from cord.workers.engines.simcost import CARDS, SHAPES, Card, Roofline, Shape

# The configs of the shapes simcost prices (their HF config.json), and one tiny shape to
# run the pipeline where there is no GPU. Each must have the parameters its Shape says.
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=False,
    ),
}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_card(device: torch.device, repeats: int) -> tuple[float, float]:
    """Bytes/s of a device-to-device copy (read + write) and bf16 matrix FLOP/s."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 512 MiB / 32 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    copy_s = timed(lambda: b.copy_(a), device, repeats)
    size = 8192 if device.type == "cuda" else 1024
    x = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    y = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    mm_s = timed(lambda: x @ y, device, repeats)
    return 2 * n * 2 / copy_s, 2 * size**3 / mm_s


def build(shape: str, device: torch.device) -> tuple[Qwen2ForCausalLM, int]:
    torch.manual_seed(0)
    cfg = Qwen2Config(**CONFIGS[shape], max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a float32 copy
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(dtype)
    return model, sum(p.numel() for p in model.parameters())


def shape_of(name: str, model: Qwen2ForCausalLM, params: int) -> Shape:
    """simcost's Shape where it has one (checked against the built model), else the
    model's own."""
    c = model.config
    own = Shape(
        name,
        float(params),
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
    )
    known = SHAPES.get(name)
    if known is None:
        return own
    if abs(known.params - params) / params > 0.02 or replace(known, params=0) != replace(
        own, params=0
    ):
        raise SystemExit(f"simcost's {name} ({known}) is not the built model ({own})")
    return known


@torch.inference_mode()
def decode_pass_s(
    model: Qwen2ForCausalLM, batch: int, context: int, device: torch.device, repeats: int
) -> float:
    """One decode pass of `batch` sequences holding `context` tokens each: the cache is
    filled once by a prefill (logits of the last token only), then each timed pass
    feeds one token per sequence and cuts the cache back to `context` tokens."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    cache = DynamicCache()
    model.model(input_ids=ids, past_key_values=cache, use_cache=True)
    step = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    position = torch.full((batch, 1), context, device=device)

    def one() -> None:
        model(input_ids=step, past_key_values=cache, position_ids=position, use_cache=True)
        cache.crop(-1)  # back to `context` tokens

    return timed(one, device, repeats)


@torch.inference_mode()
def prefill_tokens_per_s(
    model: Qwen2ForCausalLM, tokens: int, device: torch.device, repeats: int
) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    return tokens / timed(lambda: model.model(input_ids=ids, use_cache=False), device, repeats)


def card_for(device: torch.device) -> str | None:
    """The simcost card this device is, by its name (an H100 SXM only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return "h100-sxm" if "H100" in name and "PCIe" not in name else None


def error(measured: float, predicted: float) -> float:
    return round(abs(predicted - measured) / measured, 3)


def sig(x: float) -> float:
    """Four significant digits (times span microseconds to seconds)."""
    return float(f"{x:.4g}")


@click.command()
@click.option("--shape", default="qwen2.5-7b", show_default=True, type=click.Choice(CONFIGS))
@click.option("--device", default="cuda", show_default=True)
@click.option("--batches", default="1,2,4,8,16,32,64", show_default=True)
@click.option("--context", default=1024, show_default=True, help="Tokens each sequence holds.")
@click.option("--prefill-tokens", default=4096, show_default=True)
@click.option("--repeats", default=10, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the figures here.")
def main(
    shape: str,
    device: str,
    batches: str,
    context: int,
    prefill_tokens: int,
    repeats: int,
    json_path: str | None,
) -> None:
    """The roofline clock against a card (see the module docstring)."""
    dev = torch.device(device)
    figures: dict[str, Any] = {"clock_shape": shape, "clock_context": context}
    if dev.type == "cuda":
        figures["clock_device"] = torch.cuda.get_device_name(dev)
    bandwidth, flops = measure_card(dev, repeats)
    figures["clock_card_bandwidth_tb_s"] = sig(bandwidth / 1e12)
    figures["clock_card_bf16_tflop_s"] = sig(flops / 1e12)
    click.echo(f"card: {bandwidth / 1e12:.2f} TB/s, {flops / 1e12:.0f} TFLOP/s bf16", err=True)
    model, params = build(shape, dev)
    figures["clock_params"] = params
    priced = shape_of(shape, model, params)
    here = Card("measured here", bandwidth, flops, 0, 0, 0, "this run")
    clocks = {"": Roofline(here, priced)}
    known = card_for(dev)
    if known is not None:
        clocks["_sim"] = Roofline(CARDS[known], priced)  # the constants the sim runs on
    errors = []
    for b in (int(x) for x in batches.split(",")):
        got = decode_pass_s(model, b, context, dev, repeats)
        figures[f"clock_decode_s_b{b}"] = sig(got)
        for suffix, clock in clocks.items():
            pred = clock.pass_s(b, b * context, 0, 0)
            figures[f"clock_decode_pred{suffix}_s_b{b}"] = sig(pred)
            figures[f"clock_decode_error{suffix}_b{b}"] = error(got, pred)
            if not suffix:
                errors.append(error(got, pred))
        click.echo(f"decode batch {b}: {got * 1e3:.2f} ms", err=True)
    figures["clock_decode_error_max"] = max(errors)
    rate = prefill_tokens_per_s(model, prefill_tokens, dev, max(3, repeats // 3))
    figures["clock_prefill_tokens_per_s"] = sig(rate)
    for suffix, clock in clocks.items():
        pred = prefill_tokens / clock.prefill_s(prefill_tokens, prefill_tokens // 2)
        figures[f"clock_prefill_pred{suffix}_tokens_per_s"] = sig(pred)
        figures[f"clock_prefill_error{suffix}"] = error(rate, pred)
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    for k, v in figures.items():
        click.echo(f"{k}={v}")


if __name__ == "__main__":
    main()
