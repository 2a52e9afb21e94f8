"""Benchmark prompts with exact token lengths.

random  each prompt is input_len tokens (or uniform in input_len * [1 - r, 1 + r]) and asks
        for output_len tokens (same range), prompts independent of each other
prefix  num_prefixes shared prefixes of prefix_len tokens; every request is one prefix plus a
        suffix of suffix_len tokens of its own (W3: prefix caching, prefix-aware routing);
        requests are shuffled so that the users of one prefix arrive spread out

Prompts are drawn from "word tokens": vocabulary entries that decode to a space followed by
ASCII letters and encode back to themselves. The pre-tokenizer splits text at those spaces, so
any sequence of word tokens decodes to text that tokenizes back to exactly the same ids: a
prompt has its length whether it is sent as token ids or as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

_WORD = re.compile(r"^ [A-Za-z]+$")


@dataclass(frozen=True, slots=True)
class SampleRequest:
    prompt_ids: list[int]  # the exact prompt, sent as-is in `ids` prompt format
    prompt: str  # the same tokens decoded: sent in `text` format and in chat messages
    output_len: int  # max_tokens (with ignore_eos: the exact number of output tokens)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizers` tokenizer from an HF model dir (tokenizer.json inside) or the file."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


class WordVocab:
    """The word tokens of a tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        added = set(tokenizer.get_added_tokens_decoder())
        ids = [i for i in range(tokenizer.get_vocab_size(with_added_tokens=True)) if i not in added]
        texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        cand = [(i, t) for i, t in zip(ids, texts, strict=True) if _WORD.match(t)]
        encoded = tokenizer.encode_batch([t for _, t in cand], add_special_tokens=False)
        self.ids = np.array(
            [i for (i, _), e in zip(cand, encoded, strict=True) if e.ids == [i]], dtype=np.int64
        )
        if len(self.ids) < 100:
            raise ValueError(
                f"the tokenizer has only {len(self.ids)} word tokens (' ' + ASCII letters that "
                "encode to themselves); it cannot build exact-length prompts"
            )
        # Does encoding add tokens of its own (BOS)? Then text prompts would grow by them.
        self.num_special_added = len(tokenizer.encode(" a", add_special_tokens=True).ids) - len(
            tokenizer.encode(" a", add_special_tokens=False).ids
        )

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return self.ids[rng.integers(0, len(self.ids), size=n)].tolist()

    def requests(self, prompts: list[list[int]], output_lens: list[int]) -> list[SampleRequest]:
        texts = self.tokenizer.decode_batch(prompts, skip_special_tokens=False)
        return [
            SampleRequest(p, t, int(o)) for p, t, o in zip(prompts, texts, output_lens, strict=True)
        ]


def sample_lens(rng: np.random.Generator, n: int, mean_len: int, range_ratio: float) -> np.ndarray:
    """n lengths, uniform over the integers in [mean*(1-r), mean*(1+r)] (vLLM's rule), >= 1."""
    if not 0 <= range_ratio < 1:
        raise ValueError("range ratio must be in [0, 1)")
    if mean_len < 1:
        raise ValueError("lengths must be >= 1")
    low = max(1, int(mean_len * (1 - range_ratio)))
    high = max(low, int(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def random_requests(
    vocab: WordVocab,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    rng = np.random.default_rng(seed)
    in_lens = sample_lens(rng, num_prompts, input_len, range_ratio)
    out_lens = sample_lens(rng, num_prompts, output_len, range_ratio)
    return vocab.requests([vocab.sample(rng, int(n)) for n in in_lens], out_lens.tolist())


def prefix_requests(
    vocab: WordVocab,
    num_prompts: int,
    prefix_len: int,
    num_prefixes: int,
    suffix_len: int,
    output_len: int,
    seed: int = 0,
) -> list[SampleRequest]:
    """num_prompts requests over num_prefixes prefixes, used as evenly as num_prompts allows."""
    if num_prefixes < 1 or prefix_len < 1 or suffix_len < 0 or output_len < 1:
        raise ValueError("need num_prefixes >= 1, prefix_len >= 1, suffix_len >= 0, output >= 1")
    rng = np.random.default_rng(seed)
    prefixes = [vocab.sample(rng, prefix_len) for _ in range(num_prefixes)]
    owners = rng.permutation(np.arange(num_prompts) % num_prefixes)
    prompts = [prefixes[k] + vocab.sample(rng, suffix_len) for k in owners]
    return vocab.requests(prompts, [output_len] * num_prompts)
