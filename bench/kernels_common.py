"""What bench/kernels_bench.py's measurements share: Llama-3.1-8B's shapes, do_bench and
CUDA-graph timing, the ceilings, paged K/V caches in shuffled block order and SDPA's backends."""

from __future__ import annotations

import math

import torch
from triton.testing import do_bench

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


# ---------------------------------------------------------------- CUDA-graph timing


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
