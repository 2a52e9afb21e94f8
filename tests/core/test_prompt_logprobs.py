"""prompt_logprobs (vLLM's SamplingParams.prompt_logprobs) against HF transformers on the same
SmolLM2 weights: every prompt token's logprob given the tokens before it, its rank and the
top-k alternatives equal HF's log_softmax of the prompt logits (fp32), with chunked prefill
(the prompts span several 16-token steps), with a prefix-cache-warm prompt (no hit taken),
and through preemption and recompute (no entry twice)."""

from __future__ import annotations

import pytest
import torch
from core_helpers import CORPUS, save_tiny_model

from tandem import LLM, SamplingParams
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.engine_records import PromptLogprobs
from tandem.request import Request

BUDGET = 16  # max_num_batched_tokens: a 40-token prompt is prefilled in 3 chunks


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        num_blocks=128,
        max_num_batched_tokens=BUDGET,
    )


@pytest.fixture(scope="module")
def hf(llm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    ids = llm.tokenizer.encode(CORPUS, add_special_tokens=False)
    return [ids[:40], ids[50:73], ids[100:137]]


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """HF's log_softmax at positions 0..P-2, in fp32: row i scores prompt token i + 1."""
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def _check_entries(entries, ids: list[int], ref: torch.Tensor, k: int) -> None:
    """vLLM's shape: None, then per position {token: entry} with the prompt token (its own
    rank) and the top-k, all equal to HF's."""
    assert entries[0] is None
    assert len(entries) == len(ids)
    targets = torch.tensor(ids[1:])
    want = ref[torch.arange(len(targets)), targets]
    got = torch.tensor([entries[i + 1][t].logprob for i, t in enumerate(ids[1:])])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    ranks = ((ref > want[:, None]).sum(-1) + 1).tolist()
    assert [entries[i + 1][t].rank for i, t in enumerate(ids[1:])] == ranks
    for i, pos in enumerate(entries[1:]):
        assert pos[ids[i + 1]].decoded_token is not None
        if not k:
            assert set(pos) == {ids[i + 1]}
            continue
        top = ref[i].topk(k)
        assert set(pos) == set(top.indices.tolist()) | {ids[i + 1]}
        for r, (tok, value) in enumerate(zip(top.indices.tolist(), top.values, strict=True), 1):
            if tok != ids[i + 1]:
                assert pos[tok].rank == r
            assert abs(pos[tok].logprob - float(value)) < 1e-4


def test_chunked_prefill_prompt_logprobs_equal_hf(llm, hf, prompts):
    """Three prompts in one batch, each over several chunks; the middle one does not ask."""
    asking = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=5)
    plain = SamplingParams(temperature=0, max_tokens=3)
    outs = llm.generate(prompts, [asking, plain, asking], use_tqdm=False)
    assert outs[1].prompt_logprobs is None
    for ids, out in zip(prompts, outs, strict=True):
        assert len(ids) > 2 * BUDGET or out is outs[1]
        if out.prompt_logprobs is not None:
            _check_entries(out.prompt_logprobs, ids, _hf_logprobs(hf, ids), 5)
    # asking changes nothing else: the same greedy tokens as without
    again = llm.generate(prompts, plain, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_a_cache_warm_prompt_is_computed_again(llm, hf, prompts):
    ids = prompts[2]
    plain = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([ids], plain, use_tqdm=False)
    warm = llm.generate([ids], plain, use_tqdm=False)[0]
    assert warm.num_cached_tokens == (len(ids) - 1) // 16 * 16  # the prefix is cached
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    assert out.num_cached_tokens == 0  # every position's logits were computed
    _check_entries(out.prompt_logprobs, ids, _hf_logprobs(hf, ids), 0)  # k = 0: the token alone


def test_the_first_step_output_carries_them_once(llm, prompts):
    engine = llm.engine
    ids = prompts[1]
    engine.add_request("once", ids, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.req_id == "once"]
    assert len(outs) == 4
    first = outs[0].prompt_logprobs
    assert [lp.token_id for lp in first] == ids[1:]
    assert all(len(lp.top) == 2 and lp.rank >= 1 for lp in first)
    assert all(o.prompt_logprobs is None for o in outs[1:])
    assert engine.runner.prompt_logprobs.entries == {}  # forgotten when it finished


def test_preemption_and_recompute_add_no_entry_twice(hf, prompts):
    """A pool of 5 blocks for two requests of ~40 prompt + 12 output tokens: the newer one is
    preempted halfway through its chunked prefill, with entries collected, and is computed
    again from the start once the older one finished."""
    engine = LLMEngine(
        EngineConfig(
            dtype="float32",
            device="cpu",
            kernel_backend="torch",
            num_blocks=5,
            max_num_batched_tokens=BUDGET,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=3)
    both = {"a": prompts[0], "b": prompts[2]}
    for req_id, ids in both.items():
        engine.add_request(req_id, ids, params)
    firsts: dict[str, list] = {}
    preempted_with_entries = False
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.req_id not in firsts
                firsts[out.req_id] = out.prompt_logprobs
        b = engine.requests.get("b")
        if b is not None and b.num_preemptions and "b" not in firsts:
            preempted_with_entries |= bool(engine.runner.prompt_logprobs.entries.get("b"))
    assert preempted_with_entries
    for req_id, ids in both.items():
        lps = firsts[req_id]
        assert [lp.token_id for lp in lps] == ids[1:]
        ref = _hf_logprobs(hf, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor([lp.logprob for lp in lps])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_tensor_parallel_prompt_logprobs_equal_hf(tmp_path):
    """At tensor-parallel size 2 (gloo, one process per rank) the prompt rows ride in the
    step every rank runs: a tiny random Llama's entries still equal HF's."""
    hf = save_tiny_model("llama", tmp_path)
    prompts = [list(range(3, 40)), list(range(60, 71))]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    kw = dict(dtype="float32", device="cpu", kernel_backend="torch", block_size=8)
    with LLM(model=str(tmp_path), num_blocks=64, max_num_batched_tokens=BUDGET,
             tensor_parallel_size=2, **kw) as llm:  # fmt: skip
        engine = llm.engine
        for i, ids in enumerate(prompts):
            engine.add_request(f"tp{i}", ids, params)
        firsts = {}
        while engine.has_unfinished():
            firsts |= {o.req_id: o.prompt_logprobs for o in engine.step() if o.prompt_logprobs}
    for i, ids in enumerate(prompts):
        lps, ref = firsts[f"tp{i}"], _hf_logprobs(hf, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert [lp.token_id for lp in lps] == ids[1:]
        got = torch.tensor([lp.logprob for lp in lps])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert [lp.rank for lp in lps] == ((ref > want[:, None]).sum(-1) + 1).tolist()
        assert [[t for t, _ in lp.top] for lp in lps] == ref.topk(3).indices.tolist()


def test_the_tracker_skips_positions_it_has():
    """A chunk recomputed after preemption asks only for the positions past the entries."""
    track = PromptLogprobs()
    req = Request("r", list(range(10)), SamplingParams(prompt_logprobs=1), max_total_tokens=99)
    assert track.ask(req)
    assert track.spans([(req, 4)]) == [(0, 0, 4)]
    track.add("r", [None] * 4)  # positions 0..3 scored (prompt tokens 1..4)
    req.num_computed_tokens = 0  # preempted: computed again from the start
    assert track.spans([(req, 6)]) == [(0, 4, 6)]
    req.num_computed_tokens = 6
    assert track.spans([(req, 4)]) == [(0, 6, 9)]  # the last token scores nothing
    assert len(track.take("r")) == 4 and track.take("r") is None
    assert track.spans([(req, 4)]) == []  # handed out: nothing more is computed
    plain = Request("q", [1, 2, 3], SamplingParams(), max_total_tokens=99)
    assert not track.ask(plain) and track.take("q") is None
