import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ibtpo_fast.engines.radix_cache import RadixCache

SEQUENCES = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=12)


def kv_of(ids: list[int]) -> torch.Tensor:
    """K/V whose value at each position identifies the whole prefix up to it, as real K/V would."""
    values = [float(hash(tuple(ids[: t + 1])) % 1_000_003) for t in range(len(ids))]
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, -1, 1).expand(2, 2, 3, -1, 4).clone()


def matched_kv(cache: RadixCache, ids: list[int]) -> tuple[int, torch.Tensor]:
    match = cache.match_prefix(ids)
    kv = torch.cat(match.kv, dim=3) if match.kv else kv_of([])
    return match.length, kv


def test_match_insert_and_partial_match():
    cache = RadixCache(max_tokens=100)
    assert cache.match_prefix([1, 2, 3]).length == 0
    cache.insert([1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    n, kv = matched_kv(cache, [1, 2, 3, 4, 5])
    assert n == 4 and torch.equal(kv, kv_of([1, 2, 3, 4]))
    n, kv = matched_kv(cache, [1, 2, 9])  # ends inside a node
    assert n == 2 and torch.equal(kv, kv_of([1, 2]))
    assert cache.num_tokens == 4


def test_branch_splits_a_node_and_shares_the_prefix():
    cache = RadixCache(max_tokens=100)
    cache.insert([1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    cache.insert([1, 2, 7, 8, 9], kv_of([1, 2, 7, 8, 9]))
    assert cache.num_tokens == 7  # [1, 2] is stored once
    for ids in ([1, 2, 3, 4], [1, 2, 7, 8, 9]):
        n, kv = matched_kv(cache, ids)
        assert n == len(ids) and torch.equal(kv, kv_of(ids))


def test_insert_copies_out_of_a_view():
    cache = RadixCache(max_tokens=100)
    source = kv_of([5, 6, 7])
    cache.insert([5, 6, 7], source[:, :, :, :3])
    source.zero_()
    assert torch.equal(matched_kv(cache, [5, 6, 7])[1], kv_of([5, 6, 7]))


def test_lru_eviction_keeps_the_cap_and_the_recently_used():
    cache = RadixCache(max_tokens=8)
    cache.insert([1, 1, 1, 1], kv_of([1, 1, 1, 1]))
    cache.insert([2, 2, 2, 2], kv_of([2, 2, 2, 2]))
    cache.match_prefix([1, 1, 1, 1])  # now [2, ...] is the least recently used
    cache.insert([3, 3, 3, 3], kv_of([3, 3, 3, 3]))
    assert cache.num_tokens <= 8
    assert cache.match_prefix([1, 1, 1, 1]).length == 4
    assert cache.match_prefix([2, 2, 2, 2]).length == 0
    assert cache.match_prefix([3, 3, 3, 3]).length == 4


def test_locked_nodes_survive_eviction_until_unlocked():
    cache = RadixCache(max_tokens=4)
    cache.insert([1, 2, 3, 4], kv_of([1, 2, 3, 4]))
    match = cache.match_prefix([1, 2, 3, 4])
    cache.lock(match.node)
    cache.insert([1, 2, 5, 6], kv_of([1, 2, 5, 6]))  # splits the locked node, then must evict
    assert cache.match_prefix([1, 2, 3, 4]).length == 4
    cache.unlock(match.node)
    cache.insert([9, 9, 9, 9], kv_of([9, 9, 9, 9]))
    assert cache.num_tokens <= 4
    assert cache.match_prefix([9, 9, 9, 9]).length == 4


def test_reset_and_hit_rate():
    cache = RadixCache(max_tokens=100)
    cache.insert([1, 2, 3], kv_of([1, 2, 3]))
    cache.match_prefix([1, 2, 3, 4])  # 3 of 4
    cache.match_prefix([7, 8, 9, 9])  # 0 of 4
    assert cache.hit_rate == 3 / 8
    cache.reset()
    assert cache.num_tokens == 0 and cache.match_prefix([1, 2, 3]).length == 0


@settings(max_examples=60, deadline=None)
@given(SEQUENCES)
def test_matches_the_longest_inserted_prefix(sequences):
    cache = RadixCache(max_tokens=10_000)
    for ids in sequences:
        cache.insert(ids, kv_of(ids))
    for query in sequences + [s[:-1] + [9] for s in sequences]:
        expected = max(_common(query, s) for s in sequences)
        n, kv = matched_kv(cache, query)
        assert n == expected and torch.equal(kv, kv_of(query[:n]))
    assert cache.num_tokens == len({tuple(s[: i + 1]) for s in sequences for i in range(len(s))})


@settings(max_examples=40, deadline=None)
@given(SEQUENCES, st.integers(0, 12))
def test_eviction_never_exceeds_the_cap_and_never_corrupts(sequences, cap):
    cache = RadixCache(max_tokens=cap)
    for ids in sequences:
        cache.insert(ids, kv_of(ids))
        assert cache.num_tokens <= cap
        n, kv = matched_kv(cache, ids)
        assert torch.equal(kv, kv_of(ids[:n]))


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
