"""Plain helpers and constants shared by the core tests (fixtures live in conftest.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tandem import SamplingParams
from tandem.request import Request

# Varied prompts: prose, code, lists, a question, non-English, digits, a chat-shaped line.
PROMPT_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "Q: What is 17 multiplied by 3?\nA:",
    "La tour Eiffel se trouve à",
    "import numpy as np\n\nx = np.arange(10)\nprint(",
    "User: Give me a short tip for learning to cook.\nAssistant:",
]

# A long text to cut prompts of any length from.
CORPUS = (
    "The history of computing is a story of layered abstractions. Early machines were wired by "
    "hand; programs were patterns of cables and switches. Stored-program computers changed that: "
    "instructions became data, and data could be rewritten by the machine itself. Assemblers "
    "turned mnemonics into opcodes, compilers turned formulas into assembly, and operating "
    "systems turned scarce hardware into shared services. Each layer hid the one below and "
    "exposed a smaller, friendlier set of ideas. Networks then connected the machines, and the "
    "web connected the people who used them. Today a single request to a language model passes "
    "through load balancers, routers, schedulers, tokenizers, attention kernels and samplers, "
    "each written by a different team, each trusting the contract of its neighbours. When one "
    "contract is broken, the failure surfaces far away, which is why careful engineers write "
    "tests at every boundary: they compare block tables, they compare logits, they compare "
    "tokens, and they measure throughput on the same machine in the same run. A cache that "
    "forgets to release a block, a scheduler that starves a request, or a sampler that ignores "
    "a seed are all small mistakes with large consequences in production systems that serve "
    "millions of users every single day across many regions of the world."
)

MAX_NEW = 64


def hf_greedy(model, ids: list[int], max_new: int) -> list[int]:
    """HF generate, greedy, exactly max_new tokens (EOS does not stop it)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def make_request(req_id: str, token_ids: list[int], **params) -> Request:
    """A bare Request (no engine), as the scheduler and block manager see it."""
    params.setdefault("max_tokens", 16)
    return Request(req_id, list(token_ids), SamplingParams(**params), max_total_tokens=10_000)


def engine_generate(engine, prompts: list[list[int]], params) -> list:
    """Drive LLMEngine directly (no tokenizer needed): the finished Request of each prompt."""
    reqs = [engine.add_request(f"g{i}-{id(p)}", p, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    return reqs


# Tiny random checkpoints of every supported family (HF configs, saved with save_pretrained).
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=4096, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
}


def redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations: HF's 0.02-std init gives near-flat, near-tied logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def save_tiny_model(family: str, path: Path, **overrides):
    """Save a tiny random HF model of `family` into path; returns the HF model (fp32, eval)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    redraw_weights(hf, seed=len(family))
    hf.save_pretrained(path)
    return hf
