"""Tensor parallelism on CPU (gloo, one process per rank): TP=2 equals TP=1.

- greedy tokens and top logprobs, TP=2 vs TP=1, on tiny random checkpoints of each family
  (tied and untied embeddings, q/k/v bias, q/k norm), prompts batched and chunked;
- the default SmolLM2 model at TP=3 (9 heads, 3 KV heads: 2 does not divide them);
- the loader's per-rank shards concatenate back to the checkpoint's tensors, for safetensors
  and for dummy weights (drawn per tensor name, so TP=1 and TP=2 build the same model);
- a tensor-parallel size the heads do not allow is a clear error before any rank starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from core_helpers import engine_generate, greedy, save_tiny_model
from safetensors.torch import load_file

from tandem import LLM
from tandem.config import ModelConfig
from tandem.loader import load_model, read_hf_config
from tandem.tp.group import TPGroup
from tandem_kernels.registry import get_ops

pytestmark = pytest.mark.timeout(300)

TP_FAMILIES = ["llama", "llama-tied", "qwen2", "qwen3"]
ENGINE = dict(dtype="float32", device="cpu", kernel_backend="torch", block_size=8, num_blocks=96)


def _prompts(lens, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]


def _assert_same_generation(want, got) -> None:
    for a, b in zip(want, got, strict=True):
        assert b.output_token_ids == a.output_token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in y.top] == [t for t, _ in x.top]
            torch.testing.assert_close(
                torch.tensor([v for _, v in y.top]),
                torch.tensor([v for _, v in x.top]),
                atol=1e-4,
                rtol=1e-4,
            )


@pytest.mark.parametrize("family", TP_FAMILIES)
def test_tp2_greedy_and_logprobs_equal_tp1(family, tmp_path):
    save_tiny_model(family, tmp_path)
    prompts = _prompts((1, 7, 37, 90))
    # a 48-token budget: the 90-token prompt is prefilled in chunks, batched with the others
    kw = dict(ENGINE, model=str(tmp_path), max_num_batched_tokens=48)
    params = greedy(16, logprobs=5)
    want = engine_generate(LLM(**kw).engine, prompts, params)
    with LLM(**kw, tensor_parallel_size=2) as llm:
        assert llm.engine.runner.kv_cache.shape[4] == 1  # this rank's 1 of 2 KV heads
        got = engine_generate(llm.engine, prompts, params)
        _assert_same_generation(want, got)
        # the same prompts again: served from the prefix cache, still equal
        again = engine_generate(llm.engine, prompts, params)
        _assert_same_generation(want, again)
        procs = llm.engine.tp_workers.procs
    assert [p.returncode for p in procs] == [0]
    assert not dist.is_initialized()


@pytest.mark.slow
def test_default_model_tp3_equals_tp1(smollm, prompt_ids):
    prompts = prompt_ids[:2]
    params = greedy(12, logprobs=3)
    want = engine_generate(smollm.engine, prompts, params)
    with LLM(
        dtype="float32", device="cpu", kernel_backend="torch", num_blocks=512,
        tensor_parallel_size=3,
    ) as llm:  # fmt: skip
        got = engine_generate(llm.engine, prompts, params)
    _assert_same_generation(want, got)


def _unshard(models: list, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named full tensors rebuilt from each rank's parameters (rank order)."""
    tp = len(models)
    hd = cfg.head_dim
    q, kv, inter = (
        cfg.num_heads // tp * hd,
        cfg.num_kv_heads // tp * hd,
        cfg.intermediate_size // tp,
    )
    per_rank = [dict(m.named_parameters()) for m in models]
    out: dict[str, list[torch.Tensor]] = {}
    for params in per_rank:
        for name, p in params.items():
            if ".qkv_proj." in name:
                parts = {"q_proj": p[:q], "k_proj": p[q : q + kv], "v_proj": p[q + kv :]}
            elif ".gate_up_proj." in name:
                parts = {"gate_proj": p[:inter], "up_proj": p[inter:]}
            else:
                parts = {None: p}
            for part, t in parts.items():
                key = name if part is None else name.replace(name.split(".")[-2], part)
                out.setdefault(key, []).append(t)
    full = {}
    for name, shards in out.items():
        if ".o_proj." in name or ".down_proj." in name:
            full[name] = torch.cat(shards, dim=1)
        elif "lm_head" in name:
            full[name] = torch.cat(shards, dim=0)[: cfg.vocab_size]  # drop the padding rows
        elif any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            full[name] = torch.cat(shards, dim=0)
        else:  # replicated: every rank holds the same tensor
            for s in shards[1:]:
                assert torch.equal(s, shards[0]), name
            full[name] = shards[0]
    return full


def _rank_models(path, cfg: ModelConfig, tp: int, load_format: str) -> list:
    ops = get_ops("torch", torch.device("cpu"))
    return [
        load_model(
            path, cfg, ops, torch.device("cpu"), torch.float32, 64, load_format, 7, TPGroup(r, tp)
        )
        for r in range(tp)
    ]  # loading does no collective: each rank's shard can be built in this one process


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loader_shards_concatenate_to_the_checkpoint(family, tmp_path):
    # vocabulary 255: lm_head splits unevenly (128 + 127 rows, one padding row on rank 1)
    save_tiny_model(family, tmp_path, vocab_size=255)
    cfg = ModelConfig.from_hf(read_hf_config(tmp_path))
    ckpt = load_file(str(tmp_path / "model.safetensors"))
    models = _rank_models(tmp_path, cfg, 2, "safetensors")
    assert models[0].model.layers[0].self_attn.qkv_proj.weight.shape[0] == (4 + 2 * 2) // 2 * 16
    full = _unshard(models, cfg)
    if cfg.tie_word_embeddings:
        # tied at TP=2: lm_head is each rank's slice of the embedding, not a shared parameter
        torch.testing.assert_close(full.pop("lm_head.weight"), ckpt["model.embed_tokens.weight"])
    assert sorted(full) == sorted(ckpt)
    for name, t in ckpt.items():
        assert torch.equal(full[name], t), name
    assert not models[1].lm_head.weight[-1].any()  # the padding row stays zero


def test_dummy_weights_are_the_same_model_at_every_tp_size(tmp_path):
    save_tiny_model("llama", tmp_path)
    cfg = ModelConfig.from_hf(read_hf_config(tmp_path))
    one = _unshard(_rank_models(tmp_path, cfg, 1, "dummy"), cfg)
    two = _unshard(_rank_models(tmp_path, cfg, 2, "dummy"), cfg)
    assert sorted(one) == sorted(two)
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize(
    ("tp", "message"),
    [
        (3, r"attention heads \(4\) must be divisible by tensor parallel size \(3\)"),
        (4, r"KV heads \(2\) must be divisible by tensor parallel size \(4\)"),
        (0, r"tensor_parallel_size must be >= 1"),
    ],
)
def test_tp_size_the_heads_do_not_allow_is_a_clear_error(tp, message, tmp_path):
    save_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match=message):
        LLM(**ENGINE, model=str(tmp_path), tensor_parallel_size=tp)
    assert not dist.is_initialized()  # refused before any rank started


def test_default_model_at_tp2_names_its_heads():
    # SmolLM2-135M: 9 heads, 3 KV heads
    with pytest.raises(ValueError, match=r"attention heads \(9\) must be divisible"):
        LLM(device="cpu", tensor_parallel_size=2)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_tp_on_cuda_needs_as_many_gpus(tmp_path):
    save_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match="needs that many GPUs"):
        LLM(**{**ENGINE, "device": "cuda"}, model=str(tmp_path), tensor_parallel_size=2)


_HOLD_TP2 = """
import sys, time
from tandem import LLM
llm = LLM(model=sys.argv[1], device="cpu", dtype="float32", num_blocks=32, tensor_parallel_size=2)
print(llm.engine.tp_workers.procs[0].pid, flush=True)
time.sleep(600)
"""


def _start_holder(path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_TP2, str(path)], stdout=subprocess.PIPE, text=True
    )
    return proc, int(proc.stdout.readline())


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.e2e
def test_ranks_die_with_rank0_and_rank0_with_a_rank(tmp_path):
    save_tiny_model("llama", tmp_path)
    rank0, rank1 = _start_holder(tmp_path)
    os.kill(rank0.pid, signal.SIGKILL)  # no cleanup at all: PR_SET_PDEATHSIG ends rank 1
    rank0.wait()
    assert _gone(rank1)
    rank0, rank1 = _start_holder(tmp_path)
    os.kill(rank1, signal.SIGKILL)  # rank 0 could never run another forward: it exits
    assert rank0.wait(timeout=20) == 70
