"""SmolLM2-135M-Instruct (the default model): tandem equals HF transformers on the same weights.

Strict comparison: HF runs with eos_token_id=None and tandem with ignore_eos=True, so both
produce exactly MAX_NEW tokens and every one of them is compared.
"""

from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import MAX_NEW, greedy

from tandem import SamplingParams
from tandem.loader.default_model import default_gguf_path


def test_cached_weights_are_hf_gguf_reading_in_bf16(smollm, hf_smollm, prompt_ids):
    """The cache directory vs HF's own GGUF reader (the code behind
    `from_pretrained(gguf_file=...)`, minus its accelerate dependency) in fp32: every tensor is
    that reading rounded to bf16, and the rounding barely moves the logits."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = load_gguf_checkpoint(
        str(default_gguf_path()), return_tensors=True, model_to_load=hf_smollm
    )
    theirs = gguf["tensors"]
    ours = hf_smollm.state_dict()
    assert set(ours) - set(theirs) == {"lm_head.weight"}  # tied to the embedding
    for name, tensor in theirs.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(ours[name], tensor.to(torch.bfloat16).float()), name

    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "rms_norm_eps"):
        assert gguf["config"][key] == getattr(hf_smollm.config, key), key
    hf_gguf = copy.deepcopy(hf_smollm)
    missing, unexpected = hf_gguf.load_state_dict(theirs, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    ids = torch.tensor([prompt_ids[2] + prompt_ids[6]])
    with torch.inference_mode():
        ref = hf_gguf(ids).logits
        got = hf_smollm(ids).logits
    assert ref.std() > 1.0
    # measured: max 0.17 and mean 0.02 apart on logits of std ~9, every argmax the same
    diff = (got - ref).abs()
    assert 0 < diff.max() < 0.5 and diff.mean() < 0.05  # > 0: the cache really is bf16
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_prompt_logits_match_hf(smollm, hf_smollm, prompt_ids):
    """Last-position logprobs through LLM.generate vs HF's log_softmax on the prompt."""
    outs = smollm.generate(prompt_ids, greedy(1, logprobs=10), use_tqdm=False)
    for ids, out in zip(prompt_ids, outs, strict=True):
        with torch.inference_mode():
            ref = hf_smollm(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        lp = out.outputs[0].logprobs[0]
        top = ref.topk(10)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        torch.testing.assert_close(
            torch.tensor([v for _, v in lp.top]), top.values, atol=2e-4, rtol=1e-4
        )
        assert lp.token_id == out.outputs[0].token_ids[0] == int(top.indices[0])


@pytest.mark.slow
def test_greedy_tokens_equal_hf_one_prompt_at_a_time(smollm, prompt_ids, hf_reference):
    for ids, ref in zip(prompt_ids, hf_reference, strict=True):
        out = smollm.generate([ids], greedy(MAX_NEW), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref, smollm.tokenizer.decode(ids)
        assert out.finish_reason == "length"


@pytest.mark.slow
def test_greedy_tokens_equal_hf_batched(smollm, prompt_ids, hf_reference):
    outs = smollm.generate(prompt_ids, greedy(MAX_NEW), use_tqdm=False)
    assert len(outs) == len(prompt_ids) >= 8
    for ids, out, ref in zip(prompt_ids, outs, hf_reference, strict=True):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == ref, smollm.tokenizer.decode(ids)
    bm = smollm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.slow
def test_greedy_up_to_eos_equals_hf_with_eos(smollm, hf_smollm, tokenizer):
    """Without ignore_eos both stop at EOS: chat prompts, where the model does end its turn."""
    for conv in [[{"role": "user", "content": "Say hello."}]]:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.inference_mode():
            ref = hf_smollm.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        out = smollm.generate(
            [ids], SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False
        )[0].outputs[0]
        assert out.token_ids == ref
        eos = hf_smollm.generation_config.eos_token_id
        if ref[-1] == eos:
            assert out.finish_reason == "stop"
