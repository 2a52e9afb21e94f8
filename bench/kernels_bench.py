"""GPU check-and-measure pass for the Triton kernels (one call of the device tool).

    PYTHONPATH=. python bench/kernels_bench.py --out $OUT/kernels.json [--sweep]

1. ceilings, measured in this run: device-to-device copy GB/s (read + write) and bf16 matmul
   TFLOP/s (8192^3);
2. every Triton kernel vs its torch reference at Llama-3.1-8B sizes (32 q / 8 kv heads, head
   dim 128, hidden 4096, FFN 14336, block size 16): relative error;
3. decode attention: achieved GB/s (K/V + q read, output written) / copy GB/s for batch
   {1, 8, 32, 128} x context {512, 2048, 8192}, next to SDPA on contiguous K/V;
4. prefill attention: TFLOP/s (causal FLOPs only) for 1k/4k/8k prompts and a 4k+512 extend,
   next to every SDPA backend that runs (flash, efficient, cudnn, math) and the matmul rate;
5. the elementwise kernels' GB/s next to their torch references;
   decode is timed as CUDA-graph replays over enough cache copies to overflow L2 (GPU time,
   as the server runs it), and also eagerly (Python launch overhead included);
6. with --sweep, tile/split candidates for the two attention kernels.

Times are triton.testing.do_bench medians (it flushes L2 before each run) with the 20th/80th
percentiles; each headline figure is timed twice, and both medians are kept to show the spread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import accumulate

import torch
import triton
from triton.testing import do_bench

from tandem_kernels import decode_attention_triton as dat
from tandem_kernels.activation import silu_and_mul_ref
from tandem_kernels.activation_triton import silu_and_mul_triton
from tandem_kernels.decode_attention import paged_decode_attention_ref
from tandem_kernels.kv_cache_write import write_kv_cache_ref
from tandem_kernels.kv_cache_write_triton import write_kv_cache_triton
from tandem_kernels.prefill_attention import paged_prefill_attention_ref
from tandem_kernels.prefill_attention_triton import _tile_config, paged_prefill_attention_triton
from tandem_kernels.rms_norm import rms_norm_ref
from tandem_kernels.rms_norm_triton import rms_norm_triton
from tandem_kernels.rotary import rotary_ref
from tandem_kernels.rotary_triton import rotary_triton

HQ, HKV, D, HIDDEN, FFN, BS = 32, 8, 128, 4096, 14336, 16
DT = torch.bfloat16
DEV = "cuda"


def bench(fn, reps: int = 2) -> dict:
    """Median ms of each of `reps` do_bench runs, and the first run's p20/p80."""
    medians, p20, p80 = [], None, None
    for i in range(reps):
        med, lo, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        medians.append(med)
        if i == 0:
            p20, p80 = lo, hi
    return {"ms": min(medians), "ms_runs": medians, "ms_p20": p20, "ms_p80": p80}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def ceilings() -> dict:
    src = torch.randn(2**30, dtype=DT, device=DEV)  # 2 GiB read, 2 GiB written
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    copy = 2 * src.numel() * 2 / (t["ms"] * 1e-3) / 1e9
    src = dst = None
    torch.cuda.empty_cache()
    n = 8192
    a = torch.randn(n, n, dtype=DT, device=DEV)
    b = torch.randn(n, n, dtype=DT, device=DEV)
    tm = bench(lambda: a @ b)
    return {
        "gpu": torch.cuda.get_device_name(),
        "copy_GBps": round(copy, 1),
        "copy_ms_runs": t["ms_runs"],
        "matmul_TFLOPs": round(2 * n**3 / (tm["ms"] * 1e-3) / 1e12, 1),
        "matmul_ms_runs": tm["ms_runs"],
    }


# ---------------------------------------------------------------- paged cache construction


def paged_cache(seq_lens: list[int], fill: bool = True):
    """K/V caches holding exactly the sequences' blocks, in shuffled order."""
    per_seq = [math.ceil(n / BS) for n in seq_lens]
    num_blocks = sum(per_seq)
    shape = (num_blocks, BS, HKV, D)
    k_cache = torch.randn(shape, dtype=DT, device=DEV)
    v_cache = torch.randn(shape, dtype=DT, device=DEV)
    ids = torch.randperm(num_blocks, device=DEV).int()
    block_tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32, device=DEV)
    used = 0
    for b, nb in enumerate(per_seq):
        block_tables[b, :nb] = ids[used : used + nb]
        used += nb
    return k_cache, v_cache, block_tables


def contiguous_kv(k_cache, v_cache, block_tables, seq_len: int):
    """[B, Hkv, seq_len, D] copies of the paged K/V (same-length sequences), for SDPA."""
    b = block_tables.shape[0]
    k = k_cache[block_tables.long()].reshape(b, -1, HKV, D)[:, :seq_len].transpose(1, 2)
    v = v_cache[block_tables.long()].reshape(b, -1, HKV, D)[:, :seq_len].transpose(1, 2)
    return k.contiguous(), v.contiguous()


def chunk_kv(k_cache, v_cache, block_tables, batch):
    """The chunks' own K/V [T, Hkv, D] as the model passes them: strided views into one
    [T, Hq + 2 Hkv, D] buffer, like the fused qkv projection's output."""
    ks, vs = [], []
    for b, (p, n) in enumerate(batch):
        ids = block_tables[b].long()
        ks.append(k_cache[ids].flatten(0, 1)[p : p + n])
        vs.append(v_cache[ids].flatten(0, 1)[p : p + n])
    k, v = torch.cat(ks), torch.cat(vs)
    wide = torch.cat([torch.empty(k.shape[0], HQ, D, dtype=DT, device=DEV), k, v], dim=1)
    return wide[:, HQ : HQ + HKV], wide[:, HQ + HKV :]


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def time_sdpa(make_call, skip=()) -> dict:
    """Each SDPA backend that accepts the call: ms, or the error it raised."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    res = {}
    for name, backend in sdpa_backends().items():
        if name in skip:
            res[name] = "skipped"
            continue
        try:
            call = make_call(F.scaled_dot_product_attention)

            def run(call=call, backend=backend):
                with sdpa_kernel([backend]):
                    return call()

            run()
            torch.cuda.synchronize()
            res[name] = bench(run, reps=1)["ms"]
        except Exception as e:  # a backend that refuses these shapes
            res[name] = f"unsupported: {type(e).__name__}: {str(e)[:120]}"
    return res


def best_sdpa(res: dict) -> tuple[str | None, float | None]:
    times = {k: v for k, v in res.items() if isinstance(v, float)}
    if not times:
        return None, None
    k = min(times, key=times.get)
    return k, times[k]


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


def graph_time(fns, reps: int = 10) -> dict:
    """GPU time per call with launch overhead removed: the calls (cycling over `fns`, which
    read different buffers so that together they overflow L2) are captured in one CUDA graph
    and replayed. Also shows the decode kernels capture cleanly."""
    n_calls = len(fns) * math.ceil(20 / len(fns))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / n_calls)
    times.sort()
    return {"graph_ms": times[len(times) // 2], "graph_ms_min": times[0], "graph_ms_max": times[-1]}


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


# ---------------------------------------------------------------- sweeps


PREFILL_SWEEP_CONFIGS = (
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 4),
    (64, 64, 4, 3),
)


def prefill_sweep(matmul: float) -> list[dict]:
    """Tiles x where the chunk's keys come from (0 paged, 1 dense, 2 dense via TMA) x warp
    specialisation of the key loop; a variant the compiler refuses is kept with its error."""
    rows = []
    for cfg in PREFILL_SWEEP_CONFIGS:
        for load in (0, 1, 2):
            for ws in (False, True):
                for name in ("causal_1k_x8", "causal_4k_x2", "causal_8k_x1"):
                    kw = dict(config=cfg, new_kv_load=load, warp_specialize=ws)
                    try:
                        row = prefill_case(name, PREFILL_CASES[name], matmul, False, **kw)
                    except Exception as e:
                        row = {"case": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    row.update(config=cfg, load=load, warp_specialize=ws)
                    rows.append(row)
                    print("sweep prefill", cfg, load, ws, name, row.get("TFLOPs"), flush=True)
                    if "error" in row:
                        break  # the other cases of this variant would fail the same way
    return rows


def sweep(copy_gbps: float, matmul: float) -> dict:
    res = {"decode": [], "prefill": []}
    base = dat.PROGRAMS_PER_SM
    for pps in (1, 2, 4):
        dat.PROGRAMS_PER_SM = pps
        for cfg in ((64, 4, 3), (64, 4, 4), (128, 4, 3), (32, 4, 4), (64, 8, 4)):
            for batch, ctx in ((1, 8192), (8, 2048), (8, 8192), (32, 2048), (128, 8192)):
                try:
                    row = decode_case(batch, ctx, copy_gbps, False, eager=False, config=cfg)
                    row.update(pps=pps, config=cfg)
                except Exception as e:
                    row = {"pps": pps, "config": cfg, "error": str(e)[:200]}
                res["decode"].append(row)
                torch.cuda.empty_cache()
                print("sweep decode", pps, cfg, batch, ctx, row.get("frac_copy"), flush=True)
    dat.PROGRAMS_PER_SM = base
    res["prefill"] = prefill_sweep(matmul)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--prefill-sweep-only",
        action="store_true",
        help="ceilings, correctness and the prefill sweep only (skips decode and elementwise)",
    )
    args = ap.parse_args()
    t0 = time.time()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    report["ceilings"] = ceil = ceilings()
    print("CEILINGS", json.dumps(ceil), flush=True)
    report["correctness"] = corr = check_correctness()
    print("CORRECTNESS", json.dumps(corr), flush=True)
    copy, mm = ceil["copy_GBps"], ceil["matmul_TFLOPs"]
    if args.prefill_sweep_only:
        report["prefill"] = [
            prefill_case(name, batch, mm, sdpa=True) for name, batch in PREFILL_CASES.items()
        ]
        for row in report["prefill"]:
            print("prefill", row["case"], row["TFLOPs"], row["sdpa_best"], row["vs_sdpa"])
        report["prefill_sweep"] = prefill_sweep(mm)
        report["wall_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
        return 0

    report["decode"] = []
    for batch in (1, 8, 32, 128):
        for ctx in (512, 2048, 8192):
            row = decode_case(batch, ctx, copy, sdpa=True)
            report["decode"].append(row)
            torch.cuda.empty_cache()
            print(
                f"decode B={batch:4d} ctx={ctx:5d}: graph {row['graph_ms'] * 1e3:7.1f} us "
                f"{row['GBps']:6.0f} GB/s = {row['frac_copy']:.2f} of copy | eager "
                f"{row['eager_ms'] * 1e3:6.1f} us, sdpa {row['sdpa_best']} "
                f"{(row['sdpa_best_ms'] or 0) * 1e3:6.1f} us "
                f"({row['sdpa_best_GBps'] or 0:.0f} GB/s)",
                flush=True,
            )
    report["prefill_config"] = _tile_config(D, torch.device(DEV))
    report["prefill"] = []
    for name, batch in PREFILL_CASES.items():
        row = prefill_case(name, batch, mm, sdpa=True)
        report["prefill"].append(row)
        print(
            f"prefill {name:18s}: {row['ms']:7.3f} ms {row['TFLOPs']:6.1f} TFLOP/s = "
            f"{row['frac_matmul']:.2f} of matmul; sdpa best {row['sdpa_best']} "
            f"{row['sdpa_best_TFLOPs'] or 0:.1f} -> x{row['vs_sdpa'] or 0:.2f}",
            flush=True,
        )
    report["elementwise"] = elementwise(copy)
    for row in report["elementwise"]:
        print(
            f"{row['kernel']:38s} {row['ms'] * 1e3:8.1f} us {row['GBps']:6.0f} GB/s "
            f"({row['frac_copy']:.2f} of copy), x{row['speedup_vs_ref']:.1f} vs torch ref",
            flush=True,
        )
    if args.sweep:
        report["sweep"] = sweep(copy, mm)
    report["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    bad = [k for k, v in corr.items() if (isinstance(v, float) and not v <= 2e-2) or v is False]
    if bad:
        print("CORRECTNESS FAILURES:", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
