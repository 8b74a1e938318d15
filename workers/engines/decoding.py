"""The `hf` engine's decoding batch: its rows, its prefill passes, the KV slabs every
pass writes in place (`SlabLayer`) and the sampler (`sample`, Gumbel-max with a
generator per row). `hf.HFEngine` drives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from cord.common.messages import FinishReason
from cord.workers.engines.kvcache import KV


@dataclass
class Row:
    """One sequence being generated."""

    index: int  # position in the caller's item list
    prompt: torch.Tensor  # 1-D ids on CPU
    max_new: int
    temperature: float
    top_p: float
    generator: torch.Generator
    cached: int
    stops: tuple[str, ...]
    out: list[int] = field(default_factory=list)
    finish: FinishReason | None = None


@dataclass
class Pass:
    """One batched prefill: which sequences it ran and what came out."""

    rows: list[int]  # positions of its sequences in the caller's list
    logits: torch.Tensor  # [rows, span, vocab]: the new positions, holes after
    layers: KV  # [rows, heads, width + span, dim] per layer
    width: int  # cached-prefix columns (each row left-padded to it)
    hits: list[int]
    news: list[int]

    def segment(self, j: int) -> tuple[int, int]:
        """Columns of row j's tokens (cached prefix and new)."""
        return self.width - self.hits[j], self.width + self.news[j]


class SlabLayer(DynamicLayer):
    """One layer of a decoding batch's KV in a slab allocated for the whole decode: each
    pass writes its new column in place. `DynamicLayer.update` concatenates instead, a
    copy of the batch's whole KV in every layer on every pass, which on CoRD's long
    prompts and short steps was the largest cost of a decode pass after the model."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.slab_k, self.slab_v, self.length = keys, values, length
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device
        self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Point `keys` and `values` (what transformers reads) at the filled columns."""
        keys, values = self.slab_k[:, :, : self.length], self.slab_v[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.slab_k.shape[-2]:  # past the planned length: grow (not expected)
            more = end - self.slab_k.shape[-2]
            self.slab_k = torch.cat([self.slab_k, zeros_like_cols(self.slab_k, more)], dim=-2)
            self.slab_v = torch.cat([self.slab_v, zeros_like_cols(self.slab_v, more)], dim=-2)
        self.slab_k[:, :, self.length : end] = key_states
        self.slab_v[:, :, self.length : end] = value_states
        self.length = end
        return self._views()

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.slab_k, self.slab_v = self.slab_k[indices], self.slab_v[indices]
        self._views()


@dataclass(frozen=True)
class Sampling:
    """A decoding batch's sampling settings as tensors, one entry per row."""

    temps: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    nucleus: bool  # some row samples from a top-p nucleus

    @classmethod
    def of(cls, rows: list[Row], device: torch.device) -> Sampling:
        top_p = torch.tensor([r.top_p for r in rows], device=device)
        return cls(
            torch.tensor([max(r.temperature, 1e-6) for r in rows], device=device),
            top_p,
            torch.tensor([r.temperature <= 0 for r in rows], device=device),
            bool((top_p < 1.0).any()),
        )

    def select(self, index: torch.Tensor) -> Sampling:
        top_p = self.top_p[index]
        return Sampling(self.temps[index], top_p, self.greedy[index], bool((top_p < 1.0).any()))


def zeros_like_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t.new_zeros(*t.shape[:-2], cols, t.shape[-1])


def sample(logits: torch.Tensor, rows: list[Row], params: Sampling) -> list[int]:
    """One token per row, for the whole batch at once (Gumbel-max). Each row draws its
    noise from its own generator, so an item samples the same text whatever batch it
    shares; temperature 0 is argmax; top-p keeps the smallest nucleus above p.
    `params` holds the rows' settings as tensors (made once per batch, not per token)."""
    logits = logits.float()
    scaled = logits / params.temps[:, None]
    top_p = params.top_p
    if params.nucleus:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs > top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    noise = torch.stack(
        [torch.rand(logits.shape[-1], generator=r.generator, device=logits.device) for r in rows]
    )
    gumbel = -torch.log(-torch.log(noise.clamp_(1e-20, 1.0 - 1e-7)))
    choice = torch.where(params.greedy[:, None], logits, scaled + gumbel)
    return [int(t) for t in torch.argmax(choice, dim=-1).tolist()]
