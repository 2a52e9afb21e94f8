"""BlockManager on tiny sizes (block_size 4, 8 blocks): exact block ids at every step."""

from __future__ import annotations

from core_helpers import make_request

from tandem.block_hash import hash_prompt_blocks
from tandem.block_manager import BlockManager

BS = 4


def bm(num_blocks: int = 8, caching: bool = True) -> BlockManager:
    m = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    m.record_events = True  # as a worker feeding a router's prefix index does
    return m


def admit(m: BlockManager, req) -> int:
    """What the scheduler does for a fresh request: prefix match, then blocks for the rest."""
    req.num_computed_tokens = req.num_cached_tokens = m.match_prefix(req)
    m.allocate(req, req.num_tokens - req.num_computed_tokens)
    return req.num_cached_tokens


def compute_all(m: BlockManager, req) -> None:
    """The forward ran over the whole request: its full blocks become cacheable."""
    req.num_computed_tokens = req.num_tokens
    m.cache_full_blocks(req)


def free_order(m: BlockManager) -> list[int]:
    return list(m.free_queue)


def test_allocation_takes_lowest_ids_in_order():
    m = bm()
    a = make_request("a", range(10))  # 3 blocks (4 + 4 + 2)
    b = make_request("b", range(100, 105))  # 2 blocks
    assert m.allocate(a, 10) == [0, 1, 2]
    assert m.allocate(b, 5) == [3, 4]
    assert a.block_table == [0, 1, 2] and b.block_table == [3, 4]
    assert m.num_free_blocks == 3 and free_order(m) == [5, 6, 7]


def test_allocate_grows_only_at_block_boundaries():
    m = bm()
    r = make_request("r", range(4))
    assert m.allocate(r, 4) == [0]
    r.num_computed_tokens = 4
    assert m.blocks_needed(r, 1) == 1
    assert m.allocate(r, 1) == [1]  # token 5 opens block 1
    r.num_computed_tokens = 5
    assert m.blocks_needed(r, 3) == 0  # tokens 6..8 fit in block 1
    assert m.allocate(r, 3) == []
    assert r.block_table == [0, 1]


def test_free_returns_tail_first_and_reuse_is_lru():
    m = bm(caching=False)
    a = make_request("a", range(12))
    b = make_request("b", range(8))
    m.allocate(a, 12)  # [0, 1, 2]
    m.allocate(b, 8)  # [3, 4]
    m.free(a)
    # untouched blocks first, then a's blocks tail first (its prefix is evicted last)
    assert free_order(m) == [5, 6, 7, 2, 1, 0]
    m.free(b)
    assert free_order(m) == [5, 6, 7, 2, 1, 0, 4, 3]
    c = make_request("c", range(20))
    assert m.allocate(c, 20) == [5, 6, 7, 2, 1]
    assert m.num_free_blocks == 3 and a.block_table == [] and b.block_table == []


def test_can_allocate_false_when_full():
    m = bm()
    a = make_request("a", range(28))  # 7 blocks
    assert m.can_allocate(a, 28)
    m.allocate(a, 28)
    b = make_request("b", range(8))  # 2 blocks, only 1 free
    assert m.can_allocate(b, 4) and not m.can_allocate(b, 5)
    assert not m.can_allocate(b, 8)
    try:
        m.allocate(b, 8)
    except RuntimeError as e:
        assert "out of KV blocks" in str(e)
    else:
        raise AssertionError("allocate past the pool must raise")
    assert b.block_table == [] and m.num_free_blocks == 1


def test_prefix_hit_reuses_exact_block_ids():
    m = bm()
    prompt = list(range(10))  # full blocks [0..3], [4..7], then 2 tokens
    a = make_request("a", prompt)
    assert admit(m, a) == 0 and a.block_table == [0, 1, 2]
    compute_all(m, a)
    assert m.num_cached_blocks == 2
    assert m.pop_events() == (hash_prompt_blocks(prompt, BS), [])

    # a second request with the same first 8 tokens shares blocks 0 and 1 while a still runs
    b = make_request("b", prompt[:8] + [50, 51, 52])
    assert admit(m, b) == 8
    assert b.block_table == [0, 1, 3]
    assert [m.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert m.num_hit_tokens == 8 and m.num_queried_tokens == 10 + 11

    # freeing drops one reference; the shared blocks stay in use for the other request
    m.free(a)
    assert [m.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    assert free_order(m) == [4, 5, 6, 7, 2]
    m.free(b)
    assert free_order(m) == [4, 5, 6, 7, 2, 3, 1, 0]

    # cached free blocks are still hits: a third request takes 0 and 1 back out of the free queue
    c = make_request("c", prompt[:8] + [99])
    assert admit(m, c) == 8
    assert c.block_table == [0, 1, 4]
    assert free_order(m) == [5, 6, 7, 2, 3]


def test_hit_leaves_at_least_one_token_to_compute():
    m = bm()
    prompt = list(range(8))  # exactly two full blocks
    a = make_request("a", prompt)
    admit(m, a)
    compute_all(m, a)
    m.free(a)
    b = make_request("b", prompt)
    # the last block is not reused: its last token must run to produce logits
    assert admit(m, b) == 4
    assert b.block_table[0] == 0 and len(b.block_table) == 2


def test_partial_chain_match_stops_at_first_miss():
    m = bm()
    a = make_request("a", list(range(12)) + [0])
    admit(m, a)
    compute_all(m, a)
    m.free(a)
    # same second block tokens but a different first block: chained hashes never match
    b = make_request("b", [9, 9, 9, 9] + list(range(4, 12)) + [0])
    assert admit(m, b) == 0
    # same first block only
    c = make_request("c", list(range(4)) + [7] * 9)
    assert admit(m, c) == 4 and c.block_table[0] == 0


def test_eviction_of_cached_free_blocks_drops_hashes_and_records_events():
    m = bm()
    prompt = list(range(9))  # 2 full blocks cached: ids 0, 1 (block 2 holds 1 token)
    a = make_request("a", prompt)
    admit(m, a)
    compute_all(m, a)
    hashes = hash_prompt_blocks(prompt, BS)
    assert m.pop_events() == (hashes, [])
    m.free(a)
    assert free_order(m) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert m.cached == {hashes[0]: 0, hashes[1]: 1}

    # 7 new blocks: the uncached ones first, then block 1 (the tail of the cached prefix)
    b = make_request("b", range(100, 128))
    assert m.allocate(b, 28) == [3, 4, 5, 6, 7, 2, 1]
    assert m.cached == {hashes[0]: 0}
    assert m.blocks[1].hash is None and m.blocks[0].hash == hashes[0]
    assert m.pop_events() == ([], [hashes[1]])

    # the evicted block is a miss now; only the first block still hits
    c = make_request("c", prompt)
    assert m.match_prefix(c) == 4 and c.block_table == [0]
    assert m.num_free_blocks == 0 and not m.can_allocate(c, 5)


def test_same_block_computed_twice_keeps_first_copy():
    m = bm()
    a = make_request("a", range(5))
    b = make_request("b", range(5))
    admit(m, a)
    admit(m, b)  # no hit yet: a's blocks are not computed
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    compute_all(m, a)
    compute_all(m, b)
    assert m.cached == {hash_prompt_blocks(list(range(5)), BS)[0]: 0}
    assert m.blocks[2].hash is None
    m.free(a)
    m.free(b)
    assert m.num_free_blocks == 8


def test_no_prefix_caching_means_no_hits_and_no_events():
    m = bm(caching=False)
    a = make_request("a", range(9))
    admit(m, a)
    compute_all(m, a)
    m.free(a)
    b = make_request("b", range(9))
    assert admit(m, b) == 0 and b.block_table == [3, 4, 5]
    assert m.num_cached_blocks == 0 and m.pop_events() == ([], [])


def test_reset_prefix_cache_evicts_only_free_blocks():
    m = bm()
    a = make_request("a", range(9))
    b = make_request("b", range(50, 59))
    for r in (a, b):
        admit(m, r)
        compute_all(m, r)
    m.free(a)
    m.pop_events()
    m.reset_prefix_cache()
    a_hashes = hash_prompt_blocks(list(range(9)), BS)
    assert set(m.cached) == set(hash_prompt_blocks(list(range(50, 59)), BS))
    assert sorted(m.pop_events()[1]) == sorted(a_hashes)
    m.free(b)
    assert m.num_free_blocks == 8
