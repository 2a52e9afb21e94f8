"""Batch invariance on SmolLM2: each request's greedy output alone equals its output inside a
batch of 16 mixed-length requests, run with chunked prefill and with preemption forced by a
tiny block pool; afterwards every block is free again (no leaks).
"""

from __future__ import annotations

import pytest
from core_helpers import greedy

from tandem import LLM

PROMPT_LENS = [5, 17, 200, 33, 64, 9, 128, 80, 150, 12, 45, 101, 7, 180, 60, 25]
NUM_OUT = 32


@pytest.fixture(scope="module")
def batch_prompts(corpus_ids) -> list[list[int]]:
    """Slices of one text at varied offsets; a few share a start, so prefix hits happen too."""
    prompts = []
    for i, n in enumerate(PROMPT_LENS):
        start = 0 if i % 5 == 0 else (37 * i) % (len(corpus_ids) - n)
        prompts.append(corpus_ids[start : start + n])
    return prompts


@pytest.fixture(scope="module")
def alone(smollm, batch_prompts) -> list[list[int]]:
    smollm.engine.block_manager.reset_prefix_cache()
    return [
        smollm.generate([p], greedy(NUM_OUT), use_tqdm=False)[0].outputs[0].token_ids
        for p in batch_prompts
    ]


def _run_batch(llm: LLM, prompts: list[list[int]]):
    """All 16 at once through the engine, watching the token budget of every step."""
    eng = llm.engine
    steps = []
    schedule = eng.scheduler.schedule

    def watched():
        out = schedule()
        steps.append([(req.req_id, n) for req, n in out.chunks])
        return out

    eng.scheduler.schedule = watched
    try:
        outs = llm.generate(prompts, greedy(NUM_OUT), use_tqdm=False)
    finally:
        eng.scheduler.schedule = schedule
    return [o.outputs[0].token_ids for o in outs], steps


@pytest.mark.slow
def test_chunked_prefill_batch_equals_alone(batch_prompts, alone):
    budget = 64
    llm = LLM(
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        num_blocks=256,
        max_num_batched_tokens=budget,
    )
    got, steps = _run_batch(llm, batch_prompts)
    assert all(sum(n for _, n in s) <= budget for s in steps)
    # prompts longer than the budget really were split across steps
    chunk_counts: dict[str, int] = {}
    for s in steps:
        for rid, n in s:
            if n > 1:
                chunk_counts[rid] = chunk_counts.get(rid, 0) + 1
    assert max(chunk_counts.values()) >= 3
    for i, (g, a) in enumerate(zip(got, alone, strict=True)):
        assert g == a, f"request {i} (prompt {PROMPT_LENS[i]} tokens)"
    st = llm.engine.stats()
    assert st.num_free_blocks == st.num_total_blocks and st.num_running == st.num_waiting == 0


@pytest.mark.slow
def test_preempted_batch_equals_alone(batch_prompts, alone):
    # 40 blocks of 16 tokens: the largest request (232 tokens, 15 blocks) fits on its own, the
    # batch (about 110 blocks) does not: requests are preempted and recomputed
    llm = LLM(dtype="float32", device="cpu", kernel_backend="torch", num_blocks=40)
    got, _ = _run_batch(llm, batch_prompts)
    st = llm.engine.stats()
    assert st.num_preemptions > 0 and llm.engine.num_preemptions == st.num_preemptions
    for i, (g, a) in enumerate(zip(got, alone, strict=True)):
        assert g == a, f"request {i} (prompt {PROMPT_LENS[i]} tokens)"
    assert st.num_free_blocks == st.num_total_blocks == 40
    assert all(b.ref_count == 0 for b in llm.engine.block_manager.blocks)
