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
