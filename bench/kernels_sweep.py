"""bench/kernels_bench.py --sweep / --prefill-sweep-only: tile and split candidates for the two
attention kernels (what picked their defaults)."""

from __future__ import annotations

import torch

from bench.kernels_cases import PREFILL_CASES, decode_case, prefill_case
from tandem_kernels import decode_attention_triton as dat

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
