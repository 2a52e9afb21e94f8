"""GPU check-and-measure pass for the Triton kernels (one call of the device tool).

    python -m bench.kernels_bench --out $OUT/raw/kernels.json [--sweep]

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
The shared helpers are in bench/kernels_common.py, the cases in kernels_cases.py, the sweeps in
kernels_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton

from bench.kernels_cases import (
    PREFILL_CASES,
    check_correctness,
    decode_case,
    elementwise,
    prefill_case,
)
from bench.kernels_common import DEV, D, ceilings
from bench.kernels_sweep import prefill_sweep, sweep
from tandem_kernels.prefill_attention_triton import _tile_config


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
