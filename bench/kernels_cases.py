"""bench/kernels_bench.py's cases: every Triton kernel against its torch reference at full size,
decode and prefill attention next to SDPA and the ceilings, the elementwise kernels."""

from __future__ import annotations

import math
from itertools import accumulate

import torch

from bench.kernels_common import (
    BS,
    DEV,
    DT,
    FFN,
    HIDDEN,
    HKV,
    HQ,
    D,
    bench,
    best_sdpa,
    chunk_kv,
    contiguous_kv,
    graph_time,
    paged_cache,
    rel_err,
    time_sdpa,
)
from tandem_kernels import decode_attention_triton as dat
from tandem_kernels.activation import silu_and_mul_ref
from tandem_kernels.activation_triton import silu_and_mul_triton
from tandem_kernels.decode_attention import paged_decode_attention_ref
from tandem_kernels.kv_cache_write import write_kv_cache_ref
from tandem_kernels.kv_cache_write_triton import write_kv_cache_triton
from tandem_kernels.prefill_attention import paged_prefill_attention_ref
from tandem_kernels.prefill_attention_triton import paged_prefill_attention_triton
from tandem_kernels.rms_norm import rms_norm_ref
from tandem_kernels.rms_norm_triton import rms_norm_triton
from tandem_kernels.rotary import rotary_ref
from tandem_kernels.rotary_triton import rotary_triton

# ---------------------------------------------------------------- correctness at full size


def check_correctness() -> dict:
    out = {}
    x = torch.randn(256, HIDDEN, dtype=DT, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(HIDDEN, dtype=DT, device=DEV)
    o, ro = rms_norm_triton(x, w, 1e-5, r)
    oref, rref = rms_norm_ref(x, w, 1e-5, r)
    out["rms_norm"] = rel_err(o, oref)
    out["rms_norm_residual_exact"] = bool(torch.equal(ro, rref))

    t = 512
    q = torch.randn(t, HQ, D, dtype=DT, device=DEV)
    k = torch.randn(t, HKV, D, dtype=DT, device=DEV)
    ang = torch.rand(8192, D // 2, device=DEV) * 100
    cs = torch.cat((ang.cos(), ang.sin()), -1)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    (qo, ko), (qr, kr) = rotary_triton(q, k, pos, cs), rotary_ref(q, k, pos, cs)
    out["rotary"] = max(rel_err(qo, qr), rel_err(ko, kr))

    g = torch.randn(t, 2 * FFN, dtype=DT, device=DEV)
    out["silu_and_mul"] = rel_err(silu_and_mul_triton(g), silu_and_mul_ref(g))

    kc, vc, _ = paged_cache([4096])
    kr_, vr_ = kc.clone(), vc.clone()
    v = torch.randn_like(k)
    slots = torch.randperm(kc.shape[0] * BS, device=DEV)[:t]
    slots[::7] = -1
    write_kv_cache_triton(k, v, kc, vc, slots)
    write_kv_cache_ref(k, v, kr_, vr_, slots)
    out["write_kv_cache_exact"] = bool(torch.equal(kc, kr_) and torch.equal(vc, vr_))

    lens = [1, 300, 2049, 4096, 777, 1500, 3001, 8192]
    kc, vc, bt = paged_cache(lens)
    q = torch.randn(len(lens), HQ, D, dtype=DT, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    for window in (None, 1000):
        o = dat.paged_decode_attention_triton(q, kc, vc, bt, sl, D**-0.5, window)
        ref = paged_decode_attention_ref(q, kc, vc, bt, sl, D**-0.5, window)
        out[f"decode_window_{window}"] = rel_err(o, ref)

    batch = [(0, 1024), (1536, 512), (3, 700), (0, 1), (4095, 1)]
    lens = [p + n for p, n in batch]
    kc, vc, bt = paged_cache(lens)
    qsl = torch.tensor([0, *accumulate(n for _, n in batch)], dtype=torch.int32, device=DEV)
    q = torch.randn(int(qsl[-1]), HQ, D, dtype=DT, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    k, v = chunk_kv(kc, vc, bt, batch)
    for window in (None, 1000):
        ref = paged_prefill_attention_ref(q, kc, vc, bt, qsl, sl, D**-0.5, window)
        o = paged_prefill_attention_triton(q, kc, vc, bt, qsl, sl, D**-0.5, window)
        out[f"prefill_window_{window}"] = rel_err(o, ref)
        for load in (1, 2):  # the chunk read densely (the model's path), plain and through TMA
            o = paged_prefill_attention_triton(
                q, kc, vc, bt, qsl, sl, D**-0.5, window, k=k, v=v, new_kv_load=load
            )
            out[f"prefill_window_{window}_load{load}"] = rel_err(o, ref)
    return out


# ---------------------------------------------------------------- decode


def decode_case(batch: int, ctx: int, copy_gbps: float, sdpa: bool, eager=True, **kw) -> dict:
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    nbytes = kv_bytes + 2 * batch * HQ * D * 2 + batch * math.ceil(ctx / BS) * 4
    scale = D**-0.5
    fns = []
    for _ in range(max(1, math.ceil(256 * 2**20 / kv_bytes))):  # >= 256 MiB: past L2
        kc, vc, bt = paged_cache([ctx] * batch)
        q = torch.randn(batch, HQ, D, dtype=DT, device=DEV)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        fns.append(
            lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl: dat.paged_decode_attention_triton(
                q, kc, vc, bt, sl, scale, **kw
            )
        )
    fns[0]()
    t = graph_time(fns)
    gbps = nbytes / (t["graph_ms"] * 1e-3) / 1e9
    row = {"batch": batch, "ctx": ctx, "copies": len(fns), **t, "GBps": gbps}
    row["frac_copy"] = gbps / copy_gbps
    if eager:  # what one eager call costs, Python launch overhead included
        row["eager_ms"] = bench(fns[0], reps=1)["ms"]
    if sdpa:
        k, v = contiguous_kv(kc, vc, bt, ctx)
        q4 = q[:, :, None, :]

        def make(F):
            return lambda: F(q4, k, v, scale=scale, enable_gqa=True)

        # math expands K/V 4x for GQA: only where that stays small
        res = time_sdpa(make, skip=("math",) if batch * ctx > 2**16 else ())
        name, ms = best_sdpa(res)
        row["sdpa"] = res
        row["sdpa_best"] = name
        row["sdpa_best_ms"] = ms
        # eager vs eager: SDPA's own launch overhead is in its figure too
        row["vs_sdpa_eager"] = ms / row["eager_ms"] if ms else None
        row["sdpa_best_GBps"] = nbytes / (ms * 1e-3) / 1e9 if ms else None
    return row


# ---------------------------------------------------------------- prefill


def prefill_case(name: str, batch: list[tuple[int, int]], matmul: float, sdpa: bool, **kw):
    lens = [p + n for p, n in batch]
    kc, vc, bt = paged_cache(lens)
    q_lens = [n for _, n in batch]
    qsl = torch.tensor([0, *accumulate(q_lens)], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), HQ, D, dtype=DT, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = D**-0.5
    mql = max(q_lens)

    k, v = chunk_kv(kc, vc, bt, batch)  # what the model passes: the chunk read densely

    def fn():
        return paged_prefill_attention_triton(
            q, kc, vc, bt, qsl, sl, scale, max_query_len=mql, k=k, v=v, **kw
        )

    fn()
    pairs = sum(n * p + n * (n + 1) // 2 for p, n in batch)
    flops = 4 * D * HQ * pairs
    t = bench(fn, reps=2 if not kw else 1)
    row = {
        "case": name,
        "batch": batch,
        **t,
        "TFLOPs": flops / (t["ms"] * 1e-3) / 1e12,
    }
    row["frac_matmul"] = row["TFLOPs"] / matmul
    if sdpa:
        # same shapes, contiguous and GQA-expanded (what SDPA backends take most widely)
        p0, n0 = batch[0]
        assert all(b == batch[0] for b in batch)
        k, v = contiguous_kv(kc, vc, bt, p0 + n0)
        k = k.repeat_interleave(HQ // HKV, dim=1)
        v = v.repeat_interleave(HQ // HKV, dim=1)
        q4 = q.view(len(batch), n0, HQ, D).transpose(1, 2).contiguous()
        if p0 == 0:

            def make(F):
                return lambda: F(q4, k, v, is_causal=True, scale=scale)

        else:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(n0, p0 + n0)

            def make(F):
                return lambda: F(q4, k, v, attn_mask=mask, scale=scale)

        res = time_sdpa(make, skip=("math",) if p0 + n0 > 2048 else ())
        bname, ms = best_sdpa(res)
        row["sdpa"] = res
        row["sdpa_best"] = bname
        row["sdpa_best_TFLOPs"] = flops / (ms * 1e-3) / 1e12 if ms else None
        row["vs_sdpa"] = ms / t["ms"] if ms else None
    return row


PREFILL_CASES = {
    "causal_1k_x8": [(0, 1024)] * 8,
    "causal_4k_x2": [(0, 4096)] * 2,
    "causal_8k_x1": [(0, 8192)],
    "extend_4k+512_x4": [(4096, 512)] * 4,
}


# ---------------------------------------------------------------- elementwise


def elementwise(copy_gbps: float) -> list[dict]:
    t = 8192
    rows = []

    def add(name, fn, ref, nbytes):
        tt, tr = bench(fn, reps=1), bench(ref, reps=1)
        gbps = nbytes / (tt["ms"] * 1e-3) / 1e9
        rows.append(
            {
                "kernel": name,
                "ms": tt["ms"],
                "ref_ms": tr["ms"],
                "GBps": gbps,
                "frac_copy": gbps / copy_gbps,
                "speedup_vs_ref": tr["ms"] / tt["ms"],
            }
        )

    x = torch.randn(t, HIDDEN, dtype=DT, device=DEV)
    r = torch.randn_like(x)
    w = torch.randn(HIDDEN, dtype=DT, device=DEV)
    add(
        "rms_norm+residual [8192,4096]",
        lambda: rms_norm_triton(x, w, 1e-5, r),
        lambda: rms_norm_ref(x, w, 1e-5, r),
        4 * x.numel() * 2,
    )
    g = torch.randn(t, 2 * FFN, dtype=DT, device=DEV)
    add(
        "silu_and_mul [8192,2x14336]",
        lambda: silu_and_mul_triton(g),
        lambda: silu_and_mul_ref(g),
        g.numel() * 2 * 3 // 2,
    )
    q = torch.randn(t, HQ, D, dtype=DT, device=DEV)
    k = torch.randn(t, HKV, D, dtype=DT, device=DEV)
    ang = torch.rand(131072, D // 2, device=DEV)
    cs = torch.cat((ang.cos(), ang.sin()), -1)
    pos = torch.randint(0, 131072, (t,), device=DEV)
    add(
        "rotary q[8192,32,128] k[8192,8,128]",
        lambda: rotary_triton(q, k, pos, cs),
        lambda: rotary_ref(q, k, pos, cs),
        2 * (q.numel() + k.numel()) * 2 + t * D * 4,
    )
    kc, vc, _ = paged_cache([t * 4])
    v = torch.randn_like(k)
    slots = torch.randperm(kc.shape[0] * BS, device=DEV)[:t]
    add(
        "write_kv_cache T=8192",
        lambda: write_kv_cache_triton(k, v, kc, vc, slots),
        lambda: write_kv_cache_ref(k, v, kc, vc, slots),
        4 * k.numel() * 2,
    )
    return rows
