"""What a model costs on a card: the clock of the `sim` engine (workers/engines/sim.py).

A roofline, the standard first-order model of transformer inference:

- a decode pass of a batch of B sequences reads the weights once and the KV cache of
  every sequence, and does 2 x params FLOPs per sequence:
  ``max(weights / bw, B x 2 x params / flops) + kv_tokens x kv_bytes / bw``;
- a prefill of T uncached prompt tokens is compute-bound: ``T x 2 x params / flops``,
  plus attention over the context (4 x layers x heads x head_dim FLOPs per token and
  context token);

with ``bw`` and ``flops`` the card's *measured* bandwidth and matrix throughput, so the
efficiencies are those of the measurements (docs/benchmarks.md, "What a dataset costs on
GPUs", has the sources of every constant and the calibration). GenZ (`genz-llm`) models
the same and more (collectives, chunked prefill); it was not taken because it brings a
plotting stack of a dozen packages and top-level modules named `GenZ` and `Systems`, and
the sim needs only these three terms, evaluated per scheduler event.

A measured CPU server is priced by its own figures instead (`Measured`): seconds per
decode pass as ``base + per_seq x B + per_kv x context tokens``, per uncached prompt
token, and per request (whose prefill writes its first token); requests prefilled
together share one step's base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

GIB = 2**30


@dataclass(frozen=True)
class Card:
    """A GPU as measured: memory bandwidth (bytes/s), dense bf16 matrix FLOP/s, memory;
    and the scheduler limits vLLM 0.32 picks for an API server on it (by its memory:
    `max_num_batched_tokens`, the chunked-prefill budget of a pass, and `max_num_seqs`)."""

    name: str
    bandwidth: float
    flops: float
    memory_bytes: float
    batched_tokens: int
    max_seqs: int
    source: str


@dataclass(frozen=True)
class Shape:
    """A model's shape: what the roofline needs of it (bf16 weights and KV)."""

    name: str
    params: float
    layers: int
    heads: int  # attention (query) heads
    kv_heads: int
    head_dim: int

    @property
    def weight_bytes(self) -> float:
        return 2 * self.params

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


# Measured, not datasheet: an H100 SXM 80GB copied device to device at ~3.0 TB/s and ran
# a bf16 matrix product at ~798 TFLOP/s (datasheet 3.35 TB/s, 989 TFLOP/s dense). The
# 24 GB card (AWS g5's A10G) has no measurement here: its datasheet (600 GB/s, 125 TFLOP/s
# dense bf16) is scaled by the H100's measured-to-datasheet ratios (0.90, 0.81).
CARDS: dict[str, Card] = {
    "h100-sxm": Card("h100-sxm", 3.0e12, 798e12, 81_559 * 2**20, 8192, 1024, "measured"),
    "a10g": Card(
        "a10g", 0.90 * 600e9, 0.81 * 125e12, 23_028 * 2**20, 2048, 256, "datasheet x H100's ratios"
    ),
}

# The shapes of the paper's kind of teachers: Qwen2.5-32B (QwQ-32B and
# R1-Distill-Qwen-32B share it) and Qwen2.5-7B (R1-Distill-Qwen-7B), from their configs.
SHAPES: dict[str, Shape] = {
    "qwen2.5-32b": Shape("qwen2.5-32b", 32.8e9, 64, 40, 8, 128),
    "qwen2.5-7b": Shape("qwen2.5-7b", 7.6e9, 28, 28, 4, 128),
}

GPU_MEMORY_UTILIZATION = 0.95  # of the card's memory a server takes (vLLM's flag)
ACTIVATION_RESERVE_BYTES = 1 * GIB  # what the server keeps beside weights and KV


def kv_capacity_tokens(card: Card, shape: Shape) -> int:
    """Tokens of KV cache one card holds beside the weights (0 when they do not fit)."""
    free = card.memory_bytes * GPU_MEMORY_UTILIZATION - shape.weight_bytes
    free -= ACTIVATION_RESERVE_BYTES
    return max(0, int(free // shape.kv_bytes_per_token))


class Clock(Protocol):
    def pass_s(self, batch: int, kv_tokens: int, prefill: int, context: int) -> float: ...

    def prefill_s(self, tokens: int, context: int) -> float: ...

    @property
    def request_s(self) -> float: ...

    @property
    def step_s(self) -> float: ...


@dataclass(frozen=True)
class Roofline:
    card: Card
    shape: Shape

    def pass_s(self, batch: int, kv_tokens: int, prefill: int, context: int) -> float:
        """One pass: a token of each of `batch` decoding sequences (holding `kv_tokens`
        of context in all) and `prefill` prompt tokens (after `context` tokens of their
        own, mean) of a chunked prefill: bound by memory or by compute."""
        c, s = self.card, self.shape
        memory = (s.weight_bytes + kv_tokens * s.kv_bytes_per_token) / c.bandwidth
        compute = batch * 2 * s.params / c.flops + self.prefill_s(prefill, context)
        return max(memory, compute)

    def prefill_s(self, tokens: int, context: int) -> float:
        """`tokens` uncached prompt tokens after `context` tokens (mean) of context."""
        s = self.shape
        linear = 2 * s.params * tokens
        attention = 4 * s.layers * s.heads * s.head_dim * tokens * context
        return (linear + attention) / self.card.flops

    @property
    def request_s(self) -> float:
        return 0.0

    @property
    def step_s(self) -> float:
        return 0.0


@dataclass(frozen=True)
class Measured:
    """A server priced by measurements of it (a CPU vLLM server)."""

    decode_base_s: float
    decode_per_seq_s: float
    decode_per_kv_s: float  # per token of context the batch's sequences hold
    prefill_token_s: float
    per_request_s: float

    def pass_s(self, batch: int, kv_tokens: int, prefill: int, context: int) -> float:
        decode = self.decode_base_s + self.decode_per_seq_s * batch
        return decode + self.decode_per_kv_s * kv_tokens + self.prefill_s(prefill, 0)

    def prefill_s(self, tokens: int, context: int) -> float:
        return self.prefill_token_s * tokens

    @property
    def request_s(self) -> float:
        return self.per_request_s

    @property
    def step_s(self) -> float:
        """What an engine step costs whatever it runs: a prefill of prompts that
        arrived together pays it once."""
        return self.decode_base_s


def clock_of(card: str, shape: str) -> Roofline:
    """The roofline of `shape` on `card`; a ValueError names the known ones."""
    if card not in CARDS:
        raise ValueError(f"sim engine: unknown card {card!r}; use one of {sorted(CARDS)}")
    if shape not in SHAPES:
        raise ValueError(f"sim engine: unknown model shape {shape!r}; use one of {sorted(SHAPES)}")
    return Roofline(CARDS[card], SHAPES[shape])
