import random

import pytest
import torch

from cord.workers.engines.kvcache import PrefixCache, common_prefix


def kv_for(n: int, fill: float = 1.0):
    return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill))]


def ids(*values):
    return torch.tensor(values, dtype=torch.long)


def test_common_prefix():
    assert common_prefix(ids(1, 2, 3), ids(1, 2, 4, 5)) == 2
    assert common_prefix(ids(1, 2), ids(1, 2, 3)) == 2
    assert common_prefix(ids(9), ids(1)) == 0


def test_lookup_returns_longest_prefix_cropped():
    cache = PrefixCache(max_tokens=100)
    cache.store(ids(1, 2, 3), kv_for(3, 1.0))
    cache.store(ids(1, 2, 7, 8, 9), kv_for(5, 2.0))
    n, kv = cache.lookup(ids(1, 2, 7, 8, 4, 4))
    assert n == 4
    assert kv is not None and kv[0][0].shape[-2] == 4 and float(kv[0][0][0, 0, 0, 0]) == 2.0
    assert cache.lookup(ids(5, 5)) == (0, None)


def test_store_drops_entries_it_extends_and_lru_bounds_tokens():
    cache = PrefixCache(max_tokens=10)
    cache.store(ids(1, 2), kv_for(2))
    cache.store(ids(1, 2, 3, 4), kv_for(4))
    assert len(cache) == 1 and cache.tokens == 4  # the shorter entry is subsumed
    cache.store(ids(1, 2, 3), kv_for(3))  # already inside the longer one
    assert len(cache) == 1 and cache.tokens == 4
    cache.store(ids(7, 7, 7, 7), kv_for(4))
    cache.lookup(ids(1, 2, 3, 4))  # touch: now the most recent
    cache.store(ids(8, 8, 8, 8), kv_for(4))  # 12 > 10: evicts the least recent (7s)
    assert cache.tokens == 8
    assert cache.lookup(ids(7, 7))[0] == 0
    assert cache.lookup(ids(1, 2, 3, 4))[0] == 4


def test_disabled_cache_stores_nothing():
    cache = PrefixCache(max_tokens=0)
    cache.store(ids(1, 2), kv_for(2))
    assert len(cache) == 0


class Reference:
    """The cache's contract, the slow way: entries in LRU order (oldest first)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: list[list[int]] = []

    @staticmethod
    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def lookup(self, ids: list[int]) -> int:
        best = max((self.common(ids, e) for e in self.entries), default=0)
        if best:  # the least recently used of those sharing the longest prefix
            e = next(e for e in self.entries if self.common(ids, e) == best)
            self.entries.remove(e)
            self.entries.append(e)
        return best

    def store(self, ids: list[int]) -> None:
        if not ids or len(ids) > self.max_tokens:
            return
        self.entries = [e for e in self.entries if not (len(e) <= len(ids) and ids[: len(e)] == e)]
        holders = [e for e in self.entries if e[: len(ids)] == ids]
        if holders:
            self.entries.remove(holders[0])
            self.entries.append(holders[0])
            return
        self.entries.append(list(ids))
        while sum(map(len, self.entries)) > self.max_tokens:
            self.entries.pop(0)


@pytest.mark.parametrize("seed", range(6))
def test_cache_matches_the_reference_on_random_trajectories(seed):
    """Trajectories that branch and grow, as CoRD's do (shared question, steps written
    by several teachers), longer than many hash blocks; a small vocabulary makes long
    near-matches. Every lookup returns the reference's length and the KV stored for
    exactly those tokens; the entries kept are the reference's."""
    rng = random.Random(seed)
    cache, ref = PrefixCache(max_tokens=rng.choice([300, 2000])), None
    ref = Reference(cache.max_tokens)
    roots = [[rng.randrange(3) for _ in range(rng.randrange(0, 40))] for _ in range(3)]
    live = [list(r) for r in roots]
    for _ in range(400):
        base = rng.choice(live)
        if rng.random() < 0.3:
            base = base[: rng.randrange(len(base) + 1)]
        seq = base + [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        live.append(seq)
        if len(live) > 40:
            live.pop(rng.randrange(len(live)))
        t = torch.tensor(seq, dtype=torch.long)
        if rng.random() < 0.5:
            n, kv = cache.lookup(t)
            assert n == ref.lookup(seq)
            if n:
                assert kv is not None and kv[0][0].shape[-2] == n
                # Each position's key holds the token stored there: the KV is that prefix's.
                assert kv[0][0][0, 0, :, 0].tolist() == [float(x) for x in seq[:n]]
            else:
                assert kv is None
        else:
            pos = torch.tensor(seq, dtype=torch.float32)[None, None, :, None].expand(1, 2, -1, 4)
            cache.store(t, [(pos.clone(), -pos.clone())])
            ref.store(seq)
        assert sorted(e.ids.tolist() for e in cache._entries.values()) == sorted(ref.entries)
        assert cache.tokens == sum(map(len, ref.entries))
