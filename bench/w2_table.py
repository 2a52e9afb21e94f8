"""Print W2's table rows (docs/benchmarks.md) from bench/gpu_serving.py's w2.json (raw) or
its summary (bench.summarize: the same runs under "runs", without the per-request records).

python -m bench.w2_table bench/results/w2-h200-2026-12-04-s9-call6.json
"""

import json
import sys


def rows(runs: list[dict]) -> list[str]:
    out = []
    for r in runs:
        s = r["result"]["summary"]
        out.append(
            f"| {r['mode']} | {r['rate']:g} | {s['request_throughput']:.2f} | "
            f"{s['p50_ttft_ms']:,.0f} / {s['p90_ttft_ms']:,.0f} / {s['p99_ttft_ms']:,.0f} | "
            f"{s['p50_itl_ms']:.1f} / {s['p90_itl_ms']:.1f} / {s['p99_itl_ms']:.1f} | "
            f"{s['p90_tpot_ms']:.1f} | {s.get('request_goodput', float('nan')):.2f} |"
        )
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        data = json.load(f)
    print("\n".join(rows(data["runs"] if isinstance(data, dict) else data)))
