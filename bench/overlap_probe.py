"""Can a decode step read K/V while its GEMMs run? An upper bound, before building it.

A batch-512 decode step of Llama-3.1-8B runs its GEMMs (compute-bound, ~0.99 of the matmul
ceiling) and its paged attention (bandwidth-bound, ~0.90 of copy) one after the other. Split
into two half-batches, half A's GEMMs could run while half B's attention reads K/V. This
script times, on one GPU, without the dependencies a real pipeline has (so: an upper bound):

  - the 32 layers' GEMMs at M = 256 and M = 512 (QKV, O, gate/up, down; one layer's weights
    reused, 436 MB, far beyond L2), and the Triton decode attention at batch 256 and 512;
  - the two half-batch chains (GEMMs of A, attention of B) one after the other, on two plain
    streams, and on two CUDA green contexts that split the SMs (torch.cuda.green_contexts,
    several splits), each chain alone in its partition and both at once.

A full overlapped step would be two such pairs, against the serial step GEMM(512) +
attention(512).

    PYTHONPATH=. python bench/overlap_probe.py --out $OUT/overlap-probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tandem_kernels import decode_attention_triton as dat

HIDDEN, FFN, HQ, HKV, D, LAYERS, BS = 4096, 14336, 32, 8, 128, 32, 16


def gemm_chain(x: torch.Tensor, w: dict[str, torch.Tensor]):
    """One decode step's GEMMs over 32 layers, on the current stream."""
    for _ in range(LAYERS):
        qkv = x @ w["qkv"].t()
        o = qkv[:, :HIDDEN] @ w["o"].t()
        gu = o @ w["gate_up"].t()
        x = gu[:, :FFN] @ w["down"].t()
    return x


def attention_setup(batch: int, ctx: int, dev) -> tuple:
    nblk = ctx // BS
    kc = torch.randn(batch * nblk, BS, HKV, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(batch * nblk, device=dev, dtype=torch.int32).view(batch, nblk)
    sl = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
    return q, kc, vc, bt, sl


def attention_chain(args) -> None:
    q, kc, vc, bt, sl = args
    for _ in range(LAYERS):
        dat.paged_decode_attention_triton(q, kc, vc, bt, sl, D**-0.5)


def timed(fn, repeats: int = 7) -> float:
    """Median ms of fn() (which may use several streams; the current stream waits for them)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def on_streams(fa, fb, sa: torch.cuda.Stream, sb: torch.cuda.Stream):
    """fa on sa and fb on sb, both after the current stream's work; the current stream waits."""

    def run():
        cur = torch.cuda.current_stream()
        sa.wait_stream(cur)
        sb.wait_stream(cur)
        with torch.cuda.stream(sa):
            fa()
        with torch.cuda.stream(sb):
            fb()
        cur.wait_stream(sa)
        cur.wait_stream(sb)

    return run


def alone(fn, stream: torch.cuda.Stream):
    """fn by itself on stream (e.g. one green context's), the current stream waiting for it."""
    return on_streams(fn, lambda: None, stream, stream)


def green_stream(num_sms: int):
    from torch.cuda import green_contexts as gc

    cls = gc.GreenContext
    try:
        ctx = cls(num_sms=num_sms)
    except TypeError:
        ctx = cls.create(num_sms=num_sms)
    if not hasattr(ctx, "Stream"):
        raise RuntimeError("this torch's GreenContext has no Stream()")
    return ctx, ctx.Stream()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ctx", type=int, default=640, help="context tokens per sequence")
    ap.add_argument("--attention-sms", type=int, nargs="+", default=[24, 40, 56, 72])
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = {
        "qkv": torch.randn(HIDDEN + 2 * HKV * D, HIDDEN, device=dev, dtype=torch.bfloat16),
        "o": torch.randn(HIDDEN, HIDDEN, device=dev, dtype=torch.bfloat16),
        "gate_up": torch.randn(2 * FFN, HIDDEN, device=dev, dtype=torch.bfloat16),
        "down": torch.randn(HIDDEN, FFN, device=dev, dtype=torch.bfloat16),
    }
    for v in w.values():
        v.mul_(HIDDEN**-0.5)
    x256 = torch.randn(256, HIDDEN, device=dev, dtype=torch.bfloat16)
    x512 = torch.randn(512, HIDDEN, device=dev, dtype=torch.bfloat16)
    att256 = attention_setup(256, args.ctx, dev)
    att512 = attention_setup(512, args.ctx, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "sms": sms}
    res["ctx"] = args.ctx
    g256, g512 = (lambda: gemm_chain(x256, w)), (lambda: gemm_chain(x512, w))
    a256, a512 = (lambda: attention_chain(att256)), (lambda: attention_chain(att512))
    res["gemm_512_ms"] = timed(g512)
    res["attention_512_ms"] = timed(a512)
    res["serial_step_512_ms"] = res["gemm_512_ms"] + res["attention_512_ms"]
    res["gemm_256_ms"] = timed(g256)
    res["attention_256_ms"] = timed(a256)
    res["pair_serial_ms"] = timed(lambda: (g256(), a256()))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    res["pair_two_streams_ms"] = timed(on_streams(g256, a256, s1, s2))
    print(json.dumps(res), flush=True)
    res["green"] = []
    keep_alive = []
    for n_att in args.attention_sms:
        # Hopper splits SMs in groups of 8: both partitions a multiple of it
        n_gemm = (sms - n_att) // 8 * 8
        row: dict = {"attention_sms": n_att, "gemm_sms": n_gemm}
        try:
            ca, sa = green_stream(n_att)
            cg, sg = green_stream(n_gemm)
            keep_alive.append((ca, cg))  # a collected GreenContext destroys its context
        except Exception as e:  # noqa: BLE001 - report what this torch/driver lacks
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            res["green"].append(row)
            print(json.dumps(row), flush=True)
            break

        row["gemm_256_alone_ms"] = timed(alone(g256, sg))
        row["attention_256_alone_ms"] = timed(alone(a256, sa))
        row["pair_overlapped_ms"] = timed(on_streams(g256, a256, sg, sa))
        row["full_step_estimate_ms"] = 2 * row["pair_overlapped_ms"]
        row["vs_serial_512"] = row["full_step_estimate_ms"] / res["serial_step_512_ms"]
        res["green"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
