"""Prompts have exactly the asked number of tokens under the real SmolLM2 tokenizer."""

import collections

import numpy as np
import pytest

from bench.datasets import (
    WordVocab,
    load_tokenizer,
    prefix_requests,
    random_requests,
    sample_lens,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return WordVocab(tokenizer)


def test_random_prompts_have_exact_lengths_as_ids_and_as_text(tokenizer, vocab):
    reqs = random_requests(vocab, 24, input_len=333, output_len=17, seed=3)
    assert len(reqs) == 24
    for r in reqs:
        assert r.prompt_len == 333 and r.output_len == 17
        # the router tokenizes text prompts with add_special_tokens=True
        assert tokenizer.encode(r.prompt, add_special_tokens=True).ids == r.prompt_ids
    assert vocab.num_special_added == 0
    assert len({tuple(r.prompt_ids) for r in reqs}) == 24
    again = random_requests(vocab, 24, input_len=333, output_len=17, seed=3)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in reqs]


def test_range_ratio_bounds(tokenizer, vocab):
    reqs = random_requests(vocab, 200, input_len=100, output_len=50, range_ratio=0.5, seed=0)
    ins = [r.prompt_len for r in reqs]
    outs = [r.output_len for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 20
    assert min(outs) >= 25 and max(outs) <= 75
    for r in reqs[:20]:
        assert len(tokenizer.encode(r.prompt).ids) == r.prompt_len
    with pytest.raises(ValueError):
        sample_lens(np.random.default_rng(0), 3, 10, 1.0)


def test_prefix_dataset_shares_prefixes(tokenizer, vocab):
    reqs = prefix_requests(
        vocab, num_prompts=24, prefix_len=64, num_prefixes=3, suffix_len=16, output_len=8, seed=0
    )
    assert all(r.prompt_len == 80 and r.output_len == 8 for r in reqs)
    users = collections.Counter(tuple(r.prompt_ids[:64]) for r in reqs)
    assert sorted(users.values()) == [8, 8, 8]
    assert len({tuple(r.prompt_ids[64:]) for r in reqs}) == 24  # suffixes distinct
    # shuffled: the first three requests do not all share one prefix
    owners = [tuple(r.prompt_ids[:64]) for r in reqs]
    assert owners != sorted(owners, key=owners.index)
    for r in reqs[:6]:
        assert tokenizer.encode(r.prompt).ids == r.prompt_ids
