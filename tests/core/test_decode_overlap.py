"""Decode graphs that overlap (EngineConfig.decode_overlap): a large decode batch runs as two
halves on two CUDA streams, one half's attention under the other's GEMMs
(LlamaForCausalLM.forward_halves). The halves compute what one batch does.

CPU: forward_halves on one stream against forward, tiny random checkpoints (with and without
q/k norms), the torch kernels in fp32: the same hidden states and the same KV written
(to fp32 rounding: a GEMM over fewer rows may sum in another order). GPU:
two engines, overlapping graphs or not, give the same greedy tokens to 300 requests (fp32, the
8B's attention shape on two layers), and the overlapping graphs did run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from core_helpers import make_request, save_tiny_model

from tandem.config import EngineConfig
from tandem.decode_graphs import OVERLAP_MIN_BATCH
from tandem.engine import LLMEngine
from tandem.sampling_params import SamplingParams
from tandem.scheduler import ScheduledChunk

CONFIG = Path(__file__).resolve().parents[2] / "tandem" / "configs" / "llama-3.1-8b"


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_two_halves_equal_one_batch(family, tmp_path):
    save_tiny_model(family, tmp_path)
    eng = LLMEngine(
        EngineConfig(
            model=str(tmp_path), dtype="float32", device="cpu", kernel_backend="torch",
            block_size=8, num_blocks=256, max_num_batched_tokens=2048, max_model_len=512,
        )
    )  # fmt: skip
    runner, bm, vocab = eng.runner, eng.block_manager, eng.model_cfg.vocab_size
    reqs = [make_request(f"r{i}", _prompt(5 + 9 * i, i, vocab)) for i in range(7)]
    with torch.inference_mode():
        context = [ScheduledChunk(r, r.num_tokens - 1) for r in reqs]
        for req, n in context:
            bm.allocate(req, n)
        ids, pos, meta, _ = runner.prepare(context)
        runner.model(ids, pos, meta, runner.kv_caches)
        for req, n in context:
            req.num_computed_tokens += n
        step = [ScheduledChunk(r, 1) for r in reqs]
        for req, n in step:
            bm.allocate(req, n)
        ids, pos, meta, _ = runner.prepare(step)
        assert meta.decode_only
        before = runner.kv_cache.clone()
        whole = runner.model(ids, pos, meta, runner.kv_caches).clone()
        written = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        for split in (3, 1, 6):  # uneven halves too: every row lands once
            halves = runner.model.forward_halves(ids, pos, meta, runner.kv_caches, split, None)
            torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(runner.kv_cache, written, atol=1e-5, rtol=1e-5)
            runner.kv_cache.copy_(before)
    for r in reqs:
        bm.free(r)
        runner.forget(r.req_id)
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapping_graphs_give_the_same_tokens_on_gpu():
    def engine(overlap: bool) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(CONFIG), dtype="float32", load_format="dummy",
                hf_overrides={"num_hidden_layers": 2, "intermediate_size": 2048},
                max_num_seqs=320, max_num_batched_tokens=4096, max_model_len=1024,
                num_blocks=8192, cuda_graph_max_batch_size=320, decode_overlap=overlap,
            )
        )  # fmt: skip

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(3, 300, (300,), generator=g).tolist()
    prompts = [torch.randint(0, 128_000, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = []
    for overlap in (False, True):
        eng = engine(overlap)
        assert eng.runner.graphs is not None and eng.runner.graphs.overlap == overlap
        replayed: list[int] = []
        replay = eng.runner.graphs.replay

        def counted(n, b, width, _replay=replay, _seen=replayed):
            _seen.append(b)
            return _replay(n, b, width)

        eng.runner.graphs.replay = counted
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params)
        out: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for o in eng.step():
                out.setdefault(o.req_id, []).extend(o.new_token_ids)
        assert max(replayed) >= OVERLAP_MIN_BATCH  # the two-stream graphs ran
        st = eng.stats()
        assert st.num_free_blocks == st.num_total_blocks
        tokens.append(out)
        del eng
        torch.cuda.empty_cache()
    assert tokens[0] == tokens[1]
