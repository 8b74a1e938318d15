"""A prefix KV cache for the `hf` engine: LRU, bounded in tokens.

Step-wise decoding re-sends a growing prefix every step. The cache keeps the key/value
tensors of recently seen token sequences; a new request reuses the longest stored prefix
of its own token ids and computes only the rest (SGLang's radix cache does the same on
GPU; this is its small CPU/CUDA counterpart for the transformers engine).

An entry is one sequence (1-D token ids) with its per-layer (key, value) tensors of shape
[1, heads, len, head_dim]. Finding the longest stored prefix must not cost a comparison
per entry: at about 10 us each, with the hundreds of entries a meta-prover holds, that
was most of a tiny model's scoring time (docs/benchmarks.md). So each entry is indexed
by a chain hash of every whole block of `BLOCK` tokens it starts with (as vLLM's prefix
caching does): a request walks its own block hashes to the deepest block some entry
shares, and only the entries sharing it are compared, on a padded matrix of all entries'
ids (a row each, -1 after its end), over the first blocks only. Hashes only pick
candidates; lengths come from the exact comparison, so a collision cannot return a wrong
prefix. Among entries sharing the longest prefix the least recently used one wins, as it
did when the scan went entry by entry in LRU order. A few candidates (the usual case:
the entries of one trajectory's last step) are compared as Python lists, many on the
matrix: each torch call costs microseconds, which on tiny models were a tenth of CoRD's
engine time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


BLOCK = 16  # tokens per hashed block
_FEW = 32  # candidates up to this many are compared as lists, more on the matrix


@dataclass
class _Entry:
    ids: torch.Tensor  # 1-D int64 on CPU
    kv: KV
    chain: list[int]  # chain hashes of its whole blocks
    tokens: list[int]  # ids as a list, for comparisons in Python


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


def list_prefix(a: list[int], b: list[int]) -> int:
    """Common prefix length of two lists (slice comparisons run in C: a binary search
    over them beats an element loop and a tensor comparison on short lists)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def block_chain(ids: list[int]) -> list[int]:
    """Hash of ids[:BLOCK], of ids[:2 * BLOCK], ... (whole blocks only)."""
    out: list[int] = []
    h = 0
    for j in range(BLOCK, len(ids) + 1, BLOCK):
        h = hash((h, tuple(ids[j - BLOCK : j])))
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order, oldest first
        self._next = 0
        self.tokens = 0
        self.lookups = 0
        self.hit_tokens = 0
        # Row r of _ids holds the ids of the entry _row_key[r] (-1 past its end); a free
        # row is all -1, its key None and its length 0. Token ids are never negative.
        self._ids = torch.full((0, 0), -1, dtype=torch.long)
        self._lens = torch.zeros(0, dtype=torch.long)
        self._row_of: dict[int, int] = {}
        self._row_key: list[int | None] = []
        self._free: list[int] = []
        self._by_block: dict[int, set[int]] = {}  # chain hash -> entries starting so
        self._by_end: dict[int | None, set[int]] = {}  # last chain hash (None: no block)

    def __len__(self) -> int:
        return len(self._entries)

    # -- comparisons ----------------------------------------------------------------
    def _rows(self, keys: set[int] | None) -> torch.Tensor:
        """Rows of `keys` (None: every entry)."""
        if keys is None:
            return (self._lens > 0).nonzero()[:, 0]
        return torch.tensor([self._row_of[k] for k in keys], dtype=torch.long)

    def _common(self, ids: torch.Tensor, rows: torch.Tensor, upto: int) -> torch.Tensor:
        """Common prefix length of `ids` with each of `rows`, counted up to `upto`."""
        n = min(upto, int(ids.numel()), self._ids.shape[1])
        if rows.numel() == 0 or n == 0:
            return torch.zeros(rows.numel(), dtype=torch.long)
        differ = self._ids[rows, :n] != ids[:n]
        first = differ.to(torch.uint8).argmax(dim=1)  # 0 also where nothing differs
        return torch.where(differ.any(dim=1), first, n)

    def _first_in_lru(self, keys: set[int]) -> int:
        if len(keys) == 1:
            return next(iter(keys))
        return next(k for k in self._entries if k in keys)

    # -- the interface ----------------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> tuple[int, KV | None]:
        """The longest stored prefix of `ids`: its length and its KV (cropped to it)."""
        self.lookups += 1
        if not self._entries:
            return 0, None
        tokens = ids.tolist()
        chain = block_chain(tokens)
        depth = 0
        while depth < len(chain) and chain[depth] in self._by_block:
            depth += 1
        # Entries sharing `depth` blocks share no further one: the longest prefix ends
        # within the next block, unless a hash collided (then look at everything).
        keys = self._by_block[chain[depth - 1]] if depth else None
        if keys is not None and len(keys) <= _FEW:
            found = {k: list_prefix(tokens, self._entries[k].tokens) for k in keys}
            best_len = max(found.values())
            tied = {k for k, n in found.items() if n == best_len}
        else:
            best_len, tied = 0, set()
        if not tied or best_len < BLOCK * depth:
            rows = self._rows(keys)
            common = self._common(ids, rows, BLOCK * (depth + 1))
            if depth and int(common.max()) < BLOCK * depth:
                rows = self._rows(None)
                common = self._common(ids, rows, int(ids.numel()))
            best_len = int(common.max()) if common.numel() else 0
            tied = {self._row_key[r] for r in rows[common == best_len].tolist()}
        if best_len == 0:
            return 0, None
        best_key = self._first_in_lru({k for k in tied if k is not None})
        self._entries.move_to_end(best_key)
        self.hit_tokens += best_len
        return best_len, crop_kv(self._entries[best_key].kv, best_len)

    def store(self, ids: torch.Tensor, kv: KV) -> None:
        """Keep `kv` (for exactly `ids`); entries that are prefixes of it are dropped."""
        if self.max_tokens <= 0 or ids.numel() == 0 or ids.numel() > self.max_tokens:
            return
        assert kv_len(kv) == ids.numel(), (kv_len(kv), ids.numel())
        n = int(ids.numel())
        tokens = ids.tolist()
        chain = block_chain(tokens)
        if self._entries:
            # Entries that are prefixes of ids end at one of its blocks (or before any).
            ending = set(self._by_end.get(None, ()))
            for h in chain:
                ending |= self._by_end.get(h, set())
            for key in ending:
                entry = self._entries[key]
                m = len(entry.tokens)
                if m <= n and entry.tokens == tokens[:m]:
                    self._drop(key)
            # An entry holding ids starts with all of its whole blocks.
            starting = self._by_block.get(chain[-1], set()) if chain else None
            if starting is None or len(starting) > _FEW:
                rows = self._rows(starting)
                held = set()
                if rows.numel():
                    holds = (self._lens[rows] >= n) & (self._common(ids, rows, n) == n)
                    held = {self._row_key[r] for r in rows[holds].tolist()}
            else:
                held = {k for k in starting if self._entries[k].tokens[:n] == tokens}
            held.discard(None)
            if held:  # already held inside a longer entry
                self._entries.move_to_end(self._first_in_lru(held))
                return
        key = self._next
        self._next += 1
        self._entries[key] = _Entry(ids.detach().to("cpu", copy=True), kv, chain, tokens)
        self._put_row(key, self._entries[key].ids)
        for h in chain:
            self._by_block.setdefault(h, set()).add(key)
        self._by_end.setdefault(chain[-1] if chain else None, set()).add(key)
        self.tokens += n
        while self.tokens > self.max_tokens and self._entries:
            self._drop(next(iter(self._entries)))

    def _put_row(self, key: int, ids: torch.Tensor) -> None:
        rows, width = self._ids.shape
        n = int(ids.numel())
        if n > width or not self._free:
            # Grow by doubling, so that a longer entry rarely copies the whole matrix.
            new_rows = rows if self._free else max(8, 2 * rows)
            new_width = width if n <= width else max(n, 2 * width)
            grown = torch.full((new_rows, new_width), -1, dtype=torch.long)
            grown[:rows, :width] = self._ids
            self._free += list(range(len(grown) - 1, rows - 1, -1))
            self._row_key += [None] * (len(grown) - rows)
            self._lens = torch.cat([self._lens, torch.zeros(len(grown) - rows, dtype=torch.long)])
            self._ids = grown
        row = self._free.pop()
        self._ids[row, :n] = ids
        self._lens[row] = n
        self._row_of[key] = row
        self._row_key[row] = key

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.tokens -= entry.ids.numel()
        for h in set(entry.chain):
            holders = self._by_block[h]
            holders.discard(key)
            if not holders:
                del self._by_block[h]
        end = entry.chain[-1] if entry.chain else None
        self._by_end[end].discard(key)
        if not self._by_end[end]:
            del self._by_end[end]
        row = self._row_of.pop(key)
        self._ids[row] = -1
        self._lens[row] = 0
        self._row_key[row] = None
        self._free.append(row)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0
        self._ids = torch.full((0, 0), -1, dtype=torch.long)
        self._lens = torch.zeros(0, dtype=torch.long)
        self._row_of.clear()
        self._row_key = []
        self._free = []
        self._by_block.clear()
        self._by_end.clear()
