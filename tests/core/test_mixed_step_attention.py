"""A mixed step (decode rows beside prefill chunks) runs its one-token rows through the decode
kernel and the rest through the prefill kernel: the same outputs as one prefill-kernel call over
every row, with the engine putting one-token chunks first whatever the scheduler's order.

CPU: tiny random checkpoints (one with a sliding window shorter than the contexts), the torch
kernels in fp32. GPU: the 8B's attention shape on two layers, the Triton kernels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from core_helpers import engine_generate, greedy, make_request, save_tiny_model

from tandem import LLM
from tandem.block_tables import TABLE_WIDTH_ALIGN
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.runner import ModelRunner
from tandem.scheduler import ScheduledChunk
from tandem.step_inputs import StepInputs
from tandem.warmup import warm_up_kernels

CONFIG = Path(__file__).resolve().parents[2] / "tandem" / "configs" / "llama-3.1-8b"


def _forward_counting_decode_calls(model, *args) -> tuple[torch.Tensor, list[int]]:
    """model(*args) with every attention layer's decode kernel wrapped: the hidden states and
    the batch size of each decode-kernel call."""
    calls: list[int] = []
    layers = [m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "ops")]
    saved = [m.ops for m in layers]
    for m, ops in zip(layers, saved, strict=True):

        def counted(q, *a, _inner=ops.decode_attention, **kw):
            calls.append(q.shape[0])
            return _inner(q, *a, **kw)

        m.ops = dataclasses.replace(ops, decode_attention=counted)
    try:
        return model(*args), calls
    finally:
        for m, ops in zip(layers, saved, strict=True):
            m.ops = ops


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _mixed_hidden(runner: ModelRunner, bm, vocab: int, split: bool) -> tuple[torch.Tensor, list]:
    """One mixed batch, decode rows first: four requests adding their last prompt token over a
    computed context, a fresh prompt, and a prompt continuing after a computed first chunk."""
    runner.inputs.split_mixed_attention = split
    decoding = [make_request(f"d{i}", _prompt(n, i, vocab)) for i, n in enumerate((20, 33, 7, 50))]
    fresh = make_request("fresh", _prompt(23, 10, vocab))
    cont = make_request("cont", _prompt(41, 11, vocab))
    reqs = [*decoding, fresh, cont]
    try:
        with torch.inference_mode():
            # the context first: every decoding prompt but its last token, cont's first 16
            warm = [ScheduledChunk(r, r.num_tokens - 1) for r in decoding]
            warm.append(ScheduledChunk(cont, 16))
            for req, n in warm:
                bm.allocate(req, n)
            ids, pos, meta, _ = runner.inputs.prepare(warm)
            runner.model(ids, pos, meta, runner.kv_caches)
            for req, n in warm:
                req.num_computed_tokens += n
            mixed = [ScheduledChunk(r, 1) for r in decoding]
            mixed += [ScheduledChunk(fresh, fresh.num_tokens), ScheduledChunk(cont, 25)]
            for req, n in mixed:  # d1's 33rd token starts a new block
                bm.allocate(req, n)
            ids, pos, meta, _ = runner.inputs.prepare(mixed)
            assert meta.num_decode_rows == (len(decoding) if split else 0)
            _check_alignment(meta)
            hidden, calls = _forward_counting_decode_calls(
                runner.model, ids, pos, meta, runner.kv_caches
            )
        return hidden.float().clone(), calls
    finally:
        for r in reqs:
            bm.free(r)
            runner.tables.forget(r.req_id)


def _check_alignment(meta) -> None:
    """What Triton specializes a kernel on stays the same from step to step: the block tables'
    row stride is a multiple of 16 and the prefill rows' context lengths start a tensor of
    their own (a slice of seq_lens would start 4 bytes per decode row in)."""
    assert meta.block_tables.shape[1] % TABLE_WIDTH_ALIGN == 0
    if meta.num_decode_rows:
        nd = meta.num_decode_rows
        assert torch.equal(meta.prefill_seq_lens, meta.seq_lens[nd:])
        assert meta.prefill_seq_lens.storage_offset() == 0


def test_warm_up_runs_every_path_and_writes_no_kv(tmp_path):
    """The startup warm-up (on CUDA, it compiles the kernels' variants before any traffic)
    runs prefill, mixed and decode forwards over the real cache and leaves the cache as it
    was; run here directly on the torch kernels, with a chunk budget over 1k tokens."""
    save_tiny_model("llama", tmp_path)
    eng = LLMEngine(
        EngineConfig(
            model=str(tmp_path), dtype="float32", device="cpu", kernel_backend="torch",
            block_size=8, num_blocks=64, max_num_batched_tokens=2048, max_model_len=2048,
        )
    )  # fmt: skip
    runner = eng.runner
    runner.kv_cache.normal_()
    before = runner.kv_cache.clone()
    shapes: list[tuple[int, int, bool]] = []
    forward = runner.model.forward

    def watched(ids, pos, meta, caches):
        _check_alignment(meta)
        shapes.append((len(ids), meta.num_decode_rows, meta.decode_only))
        return forward(ids, pos, meta, caches)

    runner.model.forward = watched
    try:
        # max_len 2048: the block tables' full width in tokens (256 blocks of 8)
        warm_up_kernels(runner.model, runner.inputs, runner.kv_caches, 2048, 2048, 256)
    finally:
        del runner.model.forward
    assert shapes == [(16, 0, False), (1040, 0, False), (18, 2, False), (1, 0, True)] + [
        (256, 0, True)
    ]
    assert torch.equal(runner.kv_cache, before)


def _check_split_equals_unsplit(runner, bm, vocab, atol: float) -> None:
    ref, ref_calls = _mixed_hidden(runner, bm, vocab, split=False)
    got, calls = _mixed_hidden(runner, bm, vocab, split=True)
    runner.inputs.split_mixed_attention = True
    assert ref_calls == [] and calls and set(calls) == {4}  # every layer, the 4 decode rows
    assert got.shape == ref.shape == (4 + 23 + 25, ref.shape[1])
    torch.testing.assert_close(got, ref, atol=atol, rtol=atol)


@pytest.fixture(scope="module", params=["llama", "mistral-window"])
def tiny_llm(request, tmp_path_factory) -> LLM:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "mistral-window":
        save_tiny_model("mistral", path, sliding_window=12)  # shorter than most contexts
    else:
        save_tiny_model("llama", path)
    return LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        block_size=8,
        num_blocks=256,
        max_num_batched_tokens=48,
    )


def test_mixed_step_split_equals_one_prefill_call(tiny_llm):
    eng = tiny_llm.engine
    _check_split_equals_unsplit(eng.runner, eng.block_manager, eng.model_cfg.vocab_size, 1e-5)
    st = eng.stats()
    assert st.num_free_blocks == st.num_total_blocks


def test_decodes_come_first_in_a_mixed_step(tiny_llm, monkeypatch):
    """A request committed from a remote prefill joins the running batch behind a prompt still
    being chunked, so the scheduler meets that prompt's chunk first: the step still lists the
    one-token chunk first, the model takes it through the decode kernel, and both requests'
    tokens equal their tokens alone."""
    eng = tiny_llm.engine
    vocab = eng.model_cfg.vocab_size
    long_prompt, short_prompt = _prompt(150, 1, vocab), _prompt(20, 2, vocab)
    params = greedy(8)
    eng.block_manager.reset_prefix_cache()
    alone = [
        engine_generate(eng, [p], params)[0].output_token_ids for p in (long_prompt, short_prompt)
    ]
    eng.block_manager.reset_prefix_cache()
    # the short prompt's KV the way a prefill server makes it: a held one-token request
    held = eng.add_request("pre", short_prompt, greedy(1), hold_blocks=True)
    while not held.status.finished:
        eng.step()
    first = held.token_ids[-1]
    kv = eng.runner.kv_copy.gather(list(held.block_table))
    eng.release("pre")
    eng.block_manager.reset_prefix_cache()
    eng.add_request("long", long_prompt, params)
    eng.step()  # the long prompt's first chunk (48 of its 150 tokens)
    target = eng.reserve("short", short_prompt, params)
    assert target is not None and target.num_cached_tokens == 0
    eng.runner.kv_copy.scatter(target.block_ids, 0, kv.shape[0], kv)
    assert eng.commit("short", first) is None

    steps: list[tuple[list[int], int]] = []
    device_inputs = StepInputs.device_inputs

    def watched(self, host):
        ids, pos, meta = device_inputs(self, host)
        steps.append((np.diff(host.query_start_loc).tolist(), meta.num_decode_rows))
        return ids, pos, meta

    monkeypatch.setattr(StepInputs, "device_inputs", watched)
    out: dict[str, list[int]] = {"long": [], "short": [first]}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.req_id].extend(o.new_token_ids)
    assert [out["long"], out["short"]] == alone
    # the decode ahead of the long prompt's last chunk, through the decode kernel
    assert ([1, 150 - 3 * 48], 1) in steps
    for lens, num_decode_rows in steps:
        ones = [n == 1 for n in lens]
        assert ones == sorted(ones, reverse=True), lens
        assert num_decode_rows == (0 if all(ones) else sum(ones))
    st = eng.stats()
    assert st.num_free_blocks == st.num_total_blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_step_split_on_gpu_triton(dtype):
    eng = LLMEngine(
        EngineConfig(
            model=str(CONFIG),
            dtype=dtype,
            load_format="dummy",
            hf_overrides={"num_hidden_layers": 2, "intermediate_size": 2048},
            max_num_seqs=16,
            max_num_batched_tokens=512,
            max_model_len=512,
            num_blocks=512,
            cuda_graph_max_batch_size=0,
        )
    )
    assert eng.runner.ops.name == "triton"
    atol = 2e-3 if dtype == "float32" else 3e-2
    _check_split_equals_unsplit(eng.runner, eng.block_manager, eng.model_cfg.vocab_size, atol)
