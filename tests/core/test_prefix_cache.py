"""Prefix caching end to end: a second request sharing 3 full blocks computes only its suffix,
and its output equals the output computed without the cache."""

from __future__ import annotations

from core_helpers import greedy


def _scheduled_tokens(llm, prompts, params):
    """Run prompts through llm; returns outputs and {req_id: [chunk sizes]} of every step."""
    eng = llm.engine
    chunks: dict[str, list[int]] = {}
    schedule = eng.scheduler.schedule

    def watched():
        out = schedule()
        for req, n in out.chunks:
            chunks.setdefault(req.req_id, []).append(n)
        return out

    eng.scheduler.schedule = watched
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        eng.scheduler.schedule = schedule
    return outs, chunks


def test_second_request_computes_only_its_suffix(smollm, corpus_ids):
    bs = smollm.engine.cfg.block_size
    bm = smollm.engine.block_manager
    shared = corpus_ids[: 3 * bs]
    first = shared + corpus_ids[100:110]
    second = shared + corpus_ids[200:221]
    params = greedy(8)

    bm.reset_prefix_cache()
    hits_before = bm.num_hit_tokens
    (out1,), _ = _scheduled_tokens(smollm, [first], params)
    assert out1.num_cached_tokens == 0

    (out2,), chunks = _scheduled_tokens(smollm, [second], params)
    assert out2.num_cached_tokens == 3 * bs
    assert bm.num_hit_tokens - hits_before == 3 * bs
    prefill, *decodes = chunks[out2.request_id]
    assert prefill == len(second) - 3 * bs == 21
    assert decodes == [1] * 7

    # the same prompt without any cached prefix: computed in full, same tokens
    bm.reset_prefix_cache()
    (out3,), chunks = _scheduled_tokens(smollm, [second], params)
    assert out3.num_cached_tokens == 0
    assert chunks[out3.request_id][0] == len(second)
    assert out3.outputs[0].token_ids == out2.outputs[0].token_ids
    assert bm.num_free_blocks == bm.num_blocks


def test_identical_prompts_in_one_batch_and_full_block_prompt(smollm, corpus_ids):
    """A prompt of exactly 2 full blocks: the hit stops one block short (the last token must
    run to give logits); outputs equal the uncached run."""
    bs = smollm.engine.cfg.block_size
    bm = smollm.engine.block_manager
    prompt = corpus_ids[5 : 5 + 2 * bs]
    bm.reset_prefix_cache()
    (cold,), _ = _scheduled_tokens(smollm, [prompt], greedy(6))
    (warm,), chunks = _scheduled_tokens(smollm, [prompt], greedy(6))
    assert warm.num_cached_tokens == bs
    assert chunks[warm.request_id][0] == bs
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert bm.num_free_blocks == bm.num_blocks
