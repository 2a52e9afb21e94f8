"""Async scheduling on the GPU (CUDA graphs, Triton kernels): the same tokens as synchronous
steps, and no host sync inside a step's launch (the sampled tokens' copy is the only wait)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.records import SamplingParams
from tandem.runner import ModelRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = Path(__file__).resolve().parents[2] / "tandem" / "configs" / "llama-3.1-8b"
# a 2-layer model with the 8B's attention shape (32 q / 8 kv heads of 128) and vocabulary
SMALL = {"num_hidden_layers": 2, "intermediate_size": 2048}


def _engine(async_scheduling: bool) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(CONFIG),
            dtype="bfloat16",
            load_format="dummy",
            hf_overrides=SMALL,
            max_num_seqs=64,
            max_num_batched_tokens=512,
            max_model_len=1024,
            num_blocks=2048,
            cuda_graph_max_batch_size=64,
            async_scheduling=async_scheduling,
        )
    )


def _run(engine: LLMEngine, prompts, params) -> dict[str, list[int]]:
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.req_id, []).extend(o.new_token_ids)
    st = engine.stats()
    assert st.num_free_blocks == st.num_total_blocks
    return out


def test_async_equals_sync_on_gpu_and_launch_never_syncs(monkeypatch):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(3, 700, (40,), generator=g).tolist()
    prompts = [torch.randint(0, 128_000, (n,), generator=g).tolist() for n in lens]
    params = [
        SamplingParams(temperature=0, max_tokens=12 + i % 17, ignore_eos=True)
        if i % 3
        else SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=20, ignore_eos=True)
        for i in range(len(prompts))
    ]
    want = _run(_engine(False), prompts, params)

    launches = {"graph": 0, "eager": 0, "pending": 0}
    inner = ModelRunner.launch

    def no_sync_launch(self, chunks, sampling, prev):
        kind = "graph" if self._graph_fits(len(chunks), all(n == 1 for _, n in chunks)) else "eager"
        launches[kind] += 1
        launches["pending"] += sum(req.num_computed_tokens == req.num_tokens for req, _ in chunks)
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing CUDA call raises
        try:
            return inner(self, chunks, sampling, prev)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(ModelRunner, "launch", no_sync_launch)
    engine = _engine(True)
    got = _run(engine, prompts, params)
    assert got == want
    assert launches["graph"] > 10 and launches["eager"] > 0 and launches["pending"] > 100
