"""The scheduler with a real BlockManager and no model: budgets, ordering, chunking, preemption.

`step()` below plays the engine's part: every scheduled chunk is computed, and a chunk that
reaches the end of its request samples one token (here always token 1).
"""

from __future__ import annotations

from core_helpers import make_request

from tandem.block_manager import BlockManager
from tandem.request import RequestStatus
from tandem.scheduler import Scheduler


def sched(num_blocks=64, block_size=4, max_num_seqs=8, budget=32) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget)


def step(s: Scheduler) -> list[tuple[str, int]]:
    out = s.schedule()
    for req, n in out.chunks:
        req.num_computed_tokens += n
        s.bm.cache_full_blocks(req)
        if req.num_computed_tokens == req.num_tokens:
            req.token_ids.append(1)
            if req.num_output_tokens >= req.max_output_tokens:
                s.finish(req, RequestStatus.FINISHED_LENGTH)
    return [(req.req_id, n) for req, n in out.chunks]


def test_max_num_seqs_is_respected():
    s = sched(max_num_seqs=3)
    reqs = [make_request(f"r{i}", range(10 * i, 10 * i + 5), max_tokens=4) for i in range(5)]
    for r in reqs:
        s.add(r)
    assert step(s) == [("r0", 5), ("r1", 5), ("r2", 5)]
    assert [r.req_id for r in s.running] == ["r0", "r1", "r2"]
    assert [r.req_id for r in s.waiting] == ["r3", "r4"]
    while s.num_unfinished:
        assert len(s.running) <= 3
        step(s)
    assert s.bm.num_free_blocks == s.bm.num_blocks


def test_token_budget_per_step_and_chunked_prefill():
    s = sched(budget=8)
    long = make_request("long", range(100, 130), max_tokens=2)  # 30 tokens: 4 chunks of <= 8
    s.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        chunks += step(s)
    assert chunks == [("long", 8), ("long", 8), ("long", 8), ("long", 6)]
    # the chunk that reaches the end samples; earlier chunks do not
    assert long.num_computed_tokens == 30 and long.num_output_tokens == 1
    assert step(s) == [("long", 1)]
    assert long.status == RequestStatus.FINISHED_LENGTH


def test_decodes_go_before_new_prefills_and_share_the_budget():
    s = sched(budget=10)
    a = make_request("a", range(6), max_tokens=8)
    b = make_request("b", range(50, 56), max_tokens=8)
    s.add(a)
    assert step(s) == [("a", 6)]
    s.add(b)
    c = make_request("c", range(70, 90), max_tokens=8)
    s.add(c)
    # a decodes first (1 token), then b's prompt (6), then what is left goes to c's first chunk
    assert step(s) == [("a", 1), ("b", 6), ("c", 3)]
    # next step: decodes of a and b, then c continues with the rest of the budget
    assert step(s) == [("a", 1), ("b", 1), ("c", 8)]
    assert step(s) == [("a", 1), ("b", 1), ("c", 8)]
    assert step(s) == [("a", 1), ("b", 1), ("c", 1)]  # c's prompt done last step; now decoding
    for _ in range(100):
        batch = step(s)
        assert sum(n for _, n in batch) <= 10
        if not s.num_unfinished:
            break
    assert s.bm.num_free_blocks == s.bm.num_blocks


def test_running_requests_are_served_oldest_first_and_never_starved():
    s = sched(budget=4, max_num_seqs=8)
    reqs = [make_request(f"r{i}", [i] * 2, max_tokens=6) for i in range(4)]
    for r in reqs:
        s.add(r)
    assert step(s) == [("r0", 2), ("r1", 2)]
    assert step(s) == [("r0", 1), ("r1", 1), ("r2", 2)]
    assert step(s) == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 1)]
    assert step(s) == [("r0", 1), ("r1", 1), ("r2", 1), ("r3", 1)]


def test_preemption_frees_the_newest_and_requeues_it_first():
    # 6 blocks of 4: a and b (8-token prompts) take 2 blocks each, c (4 tokens) takes 1
    s = sched(num_blocks=6, block_size=4, budget=64)
    a = make_request("a", range(8), max_tokens=12)
    b = make_request("b", range(20, 28), max_tokens=12)
    c = make_request("c", range(40, 44), max_tokens=12)
    for r in (a, b, c):
        s.add(r)
    assert step(s) == [("a", 8), ("b", 8), ("c", 4)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3], [4])
    # a's and b's 9th tokens each open a block; only block 5 is free: c (newest) gives way
    out = s.schedule()
    assert [r.req_id for r in out.preempted] == ["c"]
    assert [(r.req_id, n) for r, n in out.chunks] == [("a", 1), ("b", 1)]
    assert a.block_table == [0, 1, 5] and b.block_table == [2, 3, 4]
    assert c.status == RequestStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert list(s.waiting) == [c] and c.num_preemptions == 1
    assert c.num_tokens == 5  # prompt + its first token: all recomputed on resume


def test_preempted_request_resumes_by_recompute_and_nothing_leaks():
    s = sched(num_blocks=4, block_size=4, budget=64)
    a = make_request("a", range(8), max_tokens=4)
    b = make_request("b", range(20, 28), max_tokens=4)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 8), ("b", 8)]
    out = s.schedule()  # both need a 3rd block and none is free: b gives way, a goes on
    assert [r.req_id for r in out.preempted] == ["b"]
    assert [(r.req_id, n) for r, n in out.chunks] == [("a", 1)]
    assert a.block_table == [0, 1, 3]  # b's blocks came back tail first: 3 is reused first
    a.num_computed_tokens += 1
    a.token_ids.append(1)
    # b needs 3 blocks for its 9 tokens, 1 is free: it waits while a decodes
    assert step(s) == [("a", 1)]
    assert step(s) == [("a", 1)]  # a's 4th token: a finishes
    assert a.status == RequestStatus.FINISHED_LENGTH
    # prompt + its first output token, recomputed; its first block (2) is still cached,
    # its second (3) was reused by a and lost its hash
    assert step(s) == [("b", 5)]
    assert b.num_cached_tokens == 4 and b.block_table[0] == 2
    assert b.num_output_tokens == 2
    while s.num_unfinished:
        step(s)
    assert b.num_output_tokens == 4
    assert s.bm.num_free_blocks == 4


def test_request_longer_than_the_pool_ends_with_length_instead_of_looping():
    # 4 blocks of 4 = 16 tokens of KV; 10 prompt + 20 asked would preempt itself forever
    s = sched(num_blocks=4, block_size=4, budget=64)
    r = make_request("r", range(10), max_tokens=20)
    s.add(r)
    assert r.max_output_tokens == 6
    for _ in range(20):
        if not s.num_unfinished:
            break
        step(s)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_tokens == 16
    assert r.num_preemptions == 0 and s.bm.num_free_blocks == 4


def test_failed_admission_holds_no_blocks_and_keeps_its_prefix_hit():
    s = sched(num_blocks=6, block_size=4, budget=64)
    warm = make_request("warm", range(9), max_tokens=1)
    s.add(warm)
    step(s)
    assert warm.status == RequestStatus.FINISHED_LENGTH and s.bm.num_cached_blocks == 2
    big = make_request("big", range(50, 65), max_tokens=2)  # 15 tokens: 4 blocks, then decodes
    s.add(big)
    assert step(s) == [("big", 15)]
    assert s.bm.num_free_blocks == 2  # warm's cached prefix blocks 0 and 1
    # late shares those 2 blocks but needs 2 more: it cannot start, and holds nothing meanwhile
    late = make_request("late", list(range(8)) + [90] * 5, max_tokens=4)
    s.add(late)
    assert step(s) == [("big", 1)]
    assert big.status == RequestStatus.FINISHED_LENGTH
    assert late.block_table == [] and late.status == RequestStatus.WAITING
    assert [s.bm.blocks[i].ref_count for i in (0, 1)] == [0, 0]
    assert s.bm.num_cached_blocks >= 2
    # room again: admitted with the same 2 cached blocks, only the suffix computed
    assert step(s) == [("late", 5)]
    assert late.num_cached_tokens == 8 and late.block_table[:2] == [0, 1]
