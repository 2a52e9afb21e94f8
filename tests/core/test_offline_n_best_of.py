"""n and best_of in the offline API (vLLM's semantics) on SmolLM2: n outputs indexed 0..n-1,
sample i seeded with seed + i (different samples, reproducible runs), greedy samples equal,
best_of keeps the n with the highest cumulative logprob."""

from __future__ import annotations

import math

import pytest

from tandem import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", device="cpu", kernel_backend="torch", num_blocks=128)


@pytest.fixture(scope="module")
def prompt(llm) -> list[int]:
    return llm.tokenizer.encode("Once upon a time, in a small village,", add_special_tokens=False)


def _sampled(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_n_outputs_with_indexes_and_per_sample_seeds(llm, prompt):
    outs = llm.generate([prompt, prompt[:5]], _sampled(n=3, seed=11), use_tqdm=False)
    assert [[c.index for c in out.outputs] for out in outs] == [[0, 1, 2]] * 2
    samples = [c.token_ids for c in outs[0].outputs]
    assert all(len(s) == 8 for s in samples)
    assert len({tuple(s) for s in samples}) == 3  # each sample has its own seed
    # sample i is the request seeded with seed + i, and runs reproduce
    alone = llm.generate([prompt] * 3, [_sampled(seed=11 + i) for i in range(3)], use_tqdm=False)
    assert [out.outputs[0].token_ids for out in alone] == samples
    again = llm.generate([prompt], _sampled(n=3, seed=11), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == samples
    assert all(c.cumulative_logprob is None for c in again.outputs)  # nobody asked


def test_greedy_n_gives_equal_outputs(llm, prompt):
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, n=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1


def test_cumulative_logprob_sums_the_sampled_logprobs(llm, prompt):
    out = llm.generate([prompt], _sampled(n=2, seed=3, logprobs=1), use_tqdm=False)[0]
    for c in out.outputs:
        assert len(c.logprobs) == 8
        assert math.isclose(c.cumulative_logprob, sum(lp.logprob for lp in c.logprobs))


def test_best_of_keeps_the_n_most_likely(llm, prompt):
    """best_of 4, n 2: the two of the four seeded samples (seed + 0..3, the same four that
    n=4 gives) with the highest cumulative logprob, best first, indexed 0 and 1."""
    all4 = llm.generate([prompt], _sampled(n=4, seed=5, logprobs=0), use_tqdm=False)[0]
    ranked = sorted(all4.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
    assert len({round(c.cumulative_logprob, 4) for c in ranked}) == 4
    best = llm.generate([prompt], _sampled(n=2, best_of=4, seed=5), use_tqdm=False)[0]
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    for got, want in zip(best.outputs, ranked[:2], strict=True):
        assert math.isclose(got.cumulative_logprob, want.cumulative_logprob, rel_tol=1e-6)
        assert got.logprobs is None  # the ranking's logprobs were not asked for


def test_best_of_below_n_is_refused(llm, prompt):
    with pytest.raises(ValueError, match="best_of"):
        llm.generate([prompt], SamplingParams(n=3, best_of=2), use_tqdm=False)
