"""Shared fixtures for the core tests: the default SmolLM2 model (tandem and HF on the same
weights), token-id prompts, and tiny random HF checkpoints of every supported family.

The SmolLM2 fixtures are session-scoped: loading is a few seconds, and the HF greedy reference
(the slowest part) is computed once and shared by the parity and batch tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# pytest runs with --import-mode=importlib, which does not put test folders on sys.path; the
# plain helpers next to this file are imported by name, by this file and by the test modules.
sys.path.insert(0, str(Path(__file__).parent))

from core_helpers import CORPUS, MAX_NEW, PROMPT_TEXTS, hf_greedy  # noqa: E402

from tandem import LLM  # noqa: E402


@pytest.fixture(scope="session")
def smollm() -> LLM:
    """The default model through tandem (torch kernels, fp32, small KV pool)."""
    return LLM(dtype="float32", device="cpu", kernel_backend="torch", num_blocks=512)


@pytest.fixture(scope="session")
def tokenizer(smollm):
    return smollm.tokenizer


@pytest.fixture(scope="session")
def hf_smollm(smollm):
    """HF transformers on the very same converted weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm.engine.model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p, add_special_tokens=False) for p in PROMPT_TEXTS]


@pytest.fixture(scope="session")
def corpus_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(CORPUS, add_special_tokens=False)
    assert len(ids) >= 240
    return ids


@pytest.fixture(scope="session")
def hf_reference(hf_smollm, prompt_ids) -> list[list[int]]:
    """HF's greedy continuation of each prompt, MAX_NEW tokens, one prompt at a time."""
    return [hf_greedy(hf_smollm, ids, MAX_NEW) for ids in prompt_ids]
