"""Tiny random checkpoints of every supported family: tandem's logits equal HF transformers'.

Each HF model is built from a small config, its weights redrawn at a scale that gives O(1)
logits with clear margins, saved with save_pretrained, and loaded by tandem from that directory.
Three checks per family:
  - logits at every prompt position, the prompt in one chunk and split into chunks that
    extend a cached prefix (the prefill/extend attention path);
  - the top logprobs of each greedy decode step (the paged decode path) against HF's
    log_softmax over the same sequence;
  - 16 greedy tokens equal HF generate.
"""

from __future__ import annotations

import pytest
import torch
from core_helpers import FAMILIES, engine_generate, greedy, make_request, save_tiny_model

from tandem import LLM
from tandem.scheduler import ScheduledChunk

PROMPT_LENS = (1, 7, 37, 90)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, HF model, tandem LLM) on the same random weights."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_model(request.param, path)
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        block_size=8,
        num_blocks=128,
    )
    return request.param, hf, llm


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def _tandem_logits(llm: LLM, ids: list[int], chunk_lens: list[int]) -> torch.Tensor:
    """Logits at every position, computing the prompt in chunks of chunk_lens over paged KV."""
    eng = llm.engine
    runner, bm = eng.runner, eng.block_manager
    req = make_request("logits-probe", ids)
    out = []
    try:
        for n in chunk_lens:
            bm.allocate(req, n)
            ids_t, pos, meta, _ = runner.inputs.prepare([ScheduledChunk(req, n)])
            with torch.inference_mode():
                hidden = runner.model(ids_t, pos, meta, runner.kv_caches)
                out.append(runner.model.compute_logits(hidden))
            req.num_computed_tokens += n
    finally:
        bm.free(req)
    return torch.cat(out)


def test_config_is_read_as_intended(pair):
    family, hf, llm = pair
    mc = llm.engine.model_cfg
    assert mc.architecture == hf.config.architectures[0]
    assert mc.tie_word_embeddings == hf.config.tie_word_embeddings
    assert mc.head_dim == getattr(hf.config, "head_dim", 16)
    assert mc.attention_bias == (family == "qwen2")
    assert mc.qk_norm == (family == "qwen3")
    assert dict(mc.rope_scaling).get("rope_type") == ("llama3" if family == "llama3-rope" else None)
    assert mc.eos_token_ids == (2,)


@pytest.mark.parametrize("n", PROMPT_LENS)
def test_prompt_logits_match_hf(pair, n):
    family, hf, llm = pair
    ids = _prompt(n, seed=n)
    ref = _hf_logits(hf, ids)
    assert ref.std() > 0.5, "weights too small for a meaningful comparison"
    whole = _tandem_logits(llm, ids, [n])
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)
    if n > 3:  # the same prompt in uneven chunks, each extending the cached prefix
        cuts = [n // 3, 1, n - n // 3 - 1]
        chunked = _tandem_logits(llm, ids, cuts)
        torch.testing.assert_close(chunked, ref, atol=1e-4, rtol=1e-4)


def test_decode_logprobs_and_greedy_tokens_match_hf(pair):
    family, hf, llm = pair
    for n in (5, 40):
        ids = _prompt(n, seed=100 + n)
        out = engine_generate(llm.engine, [ids], greedy(16, logprobs=5))[0]
        assert out.num_output_tokens == 16 and out.status.name == "FINISHED_LENGTH"
        # HF scores the same sequence in one forward; row p predicts token p + 1
        ref = _hf_logits(hf, out.token_ids).log_softmax(-1)[n - 1 : n + 15]
        for step, (tok, lp) in enumerate(zip(out.output_token_ids, out.logprobs, strict=True)):
            row = ref[step]
            top = row.topk(5)
            margin = float(top.values[0] - top.values[1])
            if margin > 1e-3:
                assert tok == int(top.indices[0]), (family, n, step)
            assert lp.token_id == tok
            assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
            got_vals = torch.tensor([v for _, v in lp.top])
            torch.testing.assert_close(got_vals, top.values, atol=1e-4, rtol=1e-4)

        with torch.inference_mode():
            hf_tokens = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, n, dtype=torch.long),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, n:].tolist()
        assert out.output_token_ids == hf_tokens, family
