"""A prefix KV cache for the `hf` engine: LRU, bounded in tokens.

Step-wise decoding re-sends a growing prefix every step. The cache keeps the key/value
tensors of recently seen token sequences; a new request reuses the longest stored prefix
of its own token ids and computes only the rest (SGLang's radix cache does the same on
GPU; this is its small CPU/CUDA counterpart for the transformers engine).

An entry is one sequence (1-D token ids) with its per-layer (key, value) tensors of shape
[1, heads, len, head_dim]. Lookups scan the entries (a few hundred at most at the sizes
used) and compare token ids on the tensors' device-free CPU copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Entry:
    ids: torch.Tensor  # 1-D int64 on CPU
    kv: KV


def kv_len(kv: KV) -> int:
    return int(kv[0][0].shape[-2]) if kv else 0


def crop_kv(kv: KV, length: int) -> KV:
    return [(k[..., :length, :], v[..., :length, :]) for k, v in kv]


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if diff.numel() else n


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self.tokens = 0
        self.lookups = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: torch.Tensor) -> tuple[int, KV | None]:
        """The longest stored prefix of `ids`: its length and its KV (cropped to it)."""
        self.lookups += 1
        best_len, best_key = 0, None
        for key, entry in self._entries.items():
            n = common_prefix(entry.ids, ids)
            if n > best_len:
                best_len, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hit_tokens += best_len
        return best_len, crop_kv(self._entries[best_key].kv, best_len)

    def store(self, ids: torch.Tensor, kv: KV) -> None:
        """Keep `kv` (for exactly `ids`); entries that are prefixes of it are dropped."""
        if self.max_tokens <= 0 or ids.numel() == 0 or ids.numel() > self.max_tokens:
            return
        assert kv_len(kv) == ids.numel(), (kv_len(kv), ids.numel())
        for key in [
            k
            for k, e in self._entries.items()
            if e.ids.numel() <= ids.numel() and common_prefix(e.ids, ids) == e.ids.numel()
        ]:
            self._drop(key)
        for k, e in self._entries.items():
            if e.ids.numel() >= ids.numel() and common_prefix(e.ids, ids) == ids.numel():
                self._entries.move_to_end(k)  # already held inside a longer entry
                return
        self._entries[self._next] = _Entry(ids.detach().to("cpu", copy=True), kv)
        self._next += 1
        self.tokens += ids.numel()
        while self.tokens > self.max_tokens and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.tokens -= entry.ids.numel()

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0
