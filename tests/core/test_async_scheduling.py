"""Async scheduling (tandem/engine.py) on SmolLM2, CPU: step N+1 is scheduled and launched
before step N's tokens are processed, its decode inputs taken from N's sampled tokens on the
device. Outputs must equal the synchronous engine's token for token, with chunked prefill,
preemption, stop tokens, seeds, min_tokens, aborts in flight and prefill-side requests, and
no KV block may leak or be freed while a launched step still writes it.
"""

from __future__ import annotations

import pytest
from core_helpers import greedy

from tandem import LLM, SamplingParams
from tandem.runner import ModelRunner

NUM_OUT = 24


def _llm(**kw) -> LLM:
    return LLM(dtype="float32", device="cpu", kernel_backend="torch", **kw)


@pytest.fixture(scope="module")
def async_llm() -> LLM:
    llm = _llm(num_blocks=256, async_scheduling=True)
    assert llm.engine.async_scheduling
    return llm


@pytest.fixture(scope="module")
def prompts(corpus_ids) -> list[list[int]]:
    lens = [5, 40, 90, 17, 64, 9, 120, 33]
    return [corpus_ids[(29 * i) % 100 : (29 * i) % 100 + n] for i, n in enumerate(lens)]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    llm.engine.block_manager.reset_prefix_cache()
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _count_pending_fills(monkeypatch) -> list[int]:
    """How many decode rows took their input token from the previous step on the device."""
    fills: list[int] = []
    inner = ModelRunner._fill_pending

    def counted(self, input_ids, pending, prev):
        fills.append(len(pending))
        return inner(self, input_ids, pending, prev)

    monkeypatch.setattr(ModelRunner, "_fill_pending", counted)
    return fills


def _all_free(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st.num_free_blocks == st.num_total_blocks
    assert all(b.ref_count == 0 for b in llm.engine.block_manager.blocks)
    assert st.num_running == st.num_waiting == 0 and llm.engine._inflight is None


def test_async_batch_equals_sync_with_chunked_prefill_and_preemption(prompts, monkeypatch):
    # 24 blocks of 16 tokens and a 48-token budget: prompts are split into chunks and the
    # batch (about 40 blocks) does not fit, so requests are preempted and recomputed, some
    # while their last token is still being sampled
    kw = {"num_blocks": 24, "max_num_batched_tokens": 48}
    params = greedy(NUM_OUT)
    want = _tokens(_llm(async_scheduling=False, **kw), prompts, params)
    fills = _count_pending_fills(monkeypatch)
    llm = _llm(async_scheduling=True, **kw)
    got = _tokens(llm, prompts, params)
    assert got == want
    assert llm.engine.num_preemptions > 0
    assert sum(fills) > 0  # decode inputs really came from the step before, on the device
    _all_free(llm)


def test_stop_token_drops_the_extra_step_and_frees_blocks_after_it(async_llm, smollm, prompts):
    ref = _tokens(smollm, prompts[:1], greedy(NUM_OUT))[0]
    k = 8
    stop_tok = ref[k]
    k = ref.index(stop_tok)  # its first occurrence ends the sync run
    eng = async_llm.engine
    eng.block_manager.reset_prefix_cache()
    eng.add_request("stop", prompts[0], greedy(NUM_OUT, stop_token_ids=[stop_tok]))
    tokens, finish, held_after_finish = [], None, None
    while eng.has_unfinished():
        for out in eng.step():
            tokens += out.new_token_ids
            if out.finish_reason is not None:
                finish = out.finish_reason
                # the next step (already launched) still writes this request's KV
                held_after_finish = eng.stats().num_free_blocks < eng.stats().num_total_blocks
    assert tokens == ref[: k + 1] and finish == "stop"
    assert held_after_finish
    _all_free(async_llm)


def test_seeded_sampling_and_min_tokens_equal_sync(async_llm, smollm, prompts, monkeypatch):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=NUM_OUT, min_tokens=6)
        for i in range(4)
    ]
    want = _tokens(smollm, prompts[:4], params)
    fills = _count_pending_fills(monkeypatch)
    got = _tokens(async_llm, prompts[:4], params)
    assert got == want and sum(fills) > 0
    _all_free(async_llm)


def test_penalties_and_logprobs_run_synchronously(async_llm, smollm, prompts, monkeypatch):
    params = [greedy(NUM_OUT), greedy(NUM_OUT, frequency_penalty=0.5), greedy(NUM_OUT)]
    want = _tokens(smollm, prompts[:3], params)
    fills = _count_pending_fills(monkeypatch)
    got = _tokens(async_llm, prompts[:3], params)
    assert got == want and fills == []  # no step was launched ahead while it ran
    out = async_llm.generate(prompts[:1], greedy(4, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4 and all(lp is not None for lp in out.logprobs)
    _all_free(async_llm)


def test_abort_while_its_step_is_in_flight(async_llm, prompts):
    eng = async_llm.engine
    for i in range(3):
        eng.add_request(f"ab{i}", prompts[i], greedy(NUM_OUT))
    seen: dict[str, int] = {}
    while not (eng._inflight is not None and all(seen.get(f"ab{i}", 0) >= 2 for i in range(3))):
        for out in eng.step():
            seen[out.req_id] = seen.get(out.req_id, 0) + len(out.new_token_ids)
    victim = eng.requests["ab1"]
    blocks = list(victim.block_table)
    assert victim in eng._inflight.chunk_reqs
    assert eng.abort("ab1")
    # freed only once the step that writes its KV is processed
    assert all(eng.block_manager.blocks[b].ref_count > 0 for b in blocks)
    before = seen["ab1"]
    while eng.has_unfinished():
        for out in eng.step():
            seen[out.req_id] = seen.get(out.req_id, 0) + len(out.new_token_ids)
    assert seen["ab1"] == before  # nothing after the abort
    assert seen["ab0"] == seen["ab2"] == NUM_OUT
    _all_free(async_llm)


def test_prefill_side_request_is_not_scheduled_past_its_token(async_llm, prompts):
    eng = async_llm.engine
    eng.add_request("held", prompts[2], greedy(1), hold_blocks=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.finish_reason for o in outs] == ["length"]
    req = eng.requests["held"]
    assert req.num_computed_tokens == len(prompts[2]) and req.block_table  # no extra step
    eng.release("held")
    _all_free(async_llm)


def test_more_requests_than_the_first_block_table_rows(corpus_ids):
    """100 requests at once (engines of their own): the runner's block-table array grows past
    its first 64 rows while steps run, and the rows of finished requests are reused."""
    prompts = [corpus_ids[i : i + 3 + i % 7] for i in range(100)]
    params = greedy(3)
    llm = _llm(num_blocks=256, async_scheduling=True)
    want = _tokens(_llm(num_blocks=256, async_scheduling=False), prompts, params)
    assert _tokens(llm, prompts, params) == want
    runner = llm.engine.runner.tables  # the runner's block-table rows
    assert len(runner._tables) >= 100 and not runner._slot_of
    _all_free(llm)
