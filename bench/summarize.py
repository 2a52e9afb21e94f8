"""Raw benchmark output in, a summary of a few KB out (docs/benchmarks.md, "Results").

    python -m bench.summarize bench/results/raw/w1-gateway-h200-2026-12-04.json \
        --meta gpu="NVIDIA H200" --meta commit=e781b7a
    python -m bench.summarize "$OUT"/raw/* --out-dir "$OUT"      # what bench/gpu_pass.sh does

Raw files live in bench/results/raw/ (git-ignored: a `tandem bench` result holds every
request's inter-token gaps, ~3 MB a W1 run); the summary of raw/NAME is written as NAME one
folder up (or into --out-dir), and that is what git keeps and docs/benchmarks.md cites.

- A `tandem bench` result file (bench.cli --result-file, bench.metrics.merge_results): its
  settings and summary, plus figures only the per-request records hold (`derived`).
- A list of {mode, rate, result} (bench/gpu_serving.py w2): the same for each result.
- Anything else is what a script already reduced to aggregates (kernels, engine, control
  plane, ceilings, HF peers...): it is its own summary, copied as it is when it is small.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from itertools import accumulate, pairwise
from pathlib import Path

# an aggregate-only output larger than this is not copied into git (the raw file stays)
MAX_PASSTHROUGH_BYTES = 64 * 1024


def is_bench_result(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("requests"), list) and "summary" in d


def _arrivals(r: dict) -> list[float]:
    """When each of a request's chunks reached the client, on the run's clock."""
    first = r["send_time"] + r["ttft"]
    return [first, *(first + gap for gap in accumulate(r["itl"]))]


def decode_phase(ok: list[dict]) -> dict | None:
    """The window in which every request has its first token and none has finished, and the
    mean step in it: window / tokens a request received in it. With all requests sent at
    once (W1) that is the engine's decode step as the client sees it; None when the window
    is empty (Poisson arrivals)."""
    start = max(r["send_time"] + r["ttft"] for r in ok)
    end = min(r["send_time"] + r["latency"] for r in ok)
    if end <= start:
        return None
    tokens = [
        sum(start < t <= end for t in _arrivals(r)) * r["output_tokens"] / r["num_chunks"]
        for r in ok
    ]
    per_request = sum(tokens) / len(tokens)
    return {
        "start_s": start,
        "end_s": end,
        "tokens_per_request": per_request,
        "step_ms": (end - start) / per_request * 1e3 if per_request else None,
    }


def longest_token_gap(ok: list[dict]) -> dict:
    """The longest time after the last first token in which no chunk reached the client, and
    how many requests finished after it (the end-of-run stall of the single-client runs)."""
    after = max(r["send_time"] + r["ttft"] for r in ok)
    times = sorted(t for r in ok for t in _arrivals(r) if t >= after)
    gap, at = max(((b - a, a) for a, b in pairwise(times)), default=(0.0, after))
    finished_after = sum(r["send_time"] + r["latency"] > at for r in ok)
    return {"seconds": gap, "at_s": at, "requests_finished_after": finished_after}


def derived(requests: list[dict]) -> dict:
    ok = [r for r in requests if r["success"] and r.get("num_chunks")]
    errors: dict[str, int] = {}
    for r in requests:
        if not r["success"]:
            errors[r["error"][:120]] = errors.get(r["error"][:120], 0) + 1
    out: dict = {"errors": errors}
    if not ok:
        return out
    gaps = sorted(g for r in ok for g in r["itl"])
    if gaps:
        # ITL is per chunk: a client reading chunks in bursts shows many gaps near 0
        out["itl_share_under_1ms"] = sum(g < 1e-3 for g in gaps) / len(gaps)
        out["p25_itl_ms"] = gaps[int(0.25 * (len(gaps) - 1))] * 1e3
        out["p75_itl_ms"] = gaps[int(0.75 * (len(gaps) - 1))] * 1e3
    out["decode_phase"] = decode_phase(ok)
    out["longest_token_gap"] = longest_token_gap(ok)
    return out


def bench_summary(d: dict) -> dict:
    keep = {k: v for k, v in d.items() if k != "requests"}
    return {**keep, "derived": derived(d["requests"])}


def summarize(data, meta: dict[str, str]) -> dict | None:
    """The summary of one raw file's parsed JSON, or None when it is its own summary."""
    head = {"meta": meta} if meta else {}
    if is_bench_result(data):
        return {**head, **bench_summary(data)}
    if isinstance(data, list) and data and all(is_bench_result(x.get("result")) for x in data):
        runs = [{**x, "result": bench_summary(x["result"])} for x in data]
        return {**head, "runs": runs}
    return None


def summarize_file(raw: Path, out_dir: Path, meta: dict[str, str] | None = None) -> Path | None:
    """Write raw's summary to out_dir / raw.name; returns its path (None: no summary)."""
    meta = meta or {}
    out = out_dir / raw.name
    if out.resolve() == raw.resolve():
        raise ValueError(f"{raw}: the summary would overwrite the raw file (pass --out-dir)")
    try:
        data = json.loads(raw.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    summary = summarize(data, meta) if data is not None else None
    if summary is not None:
        out.write_text(json.dumps(summary, indent=1) + "\n")
    elif raw.stat().st_size > MAX_PASSTHROUGH_BYTES:
        print(f"{raw}: no summary (unknown kind, {raw.stat().st_size} bytes)", file=sys.stderr)
        return None
    elif meta and isinstance(data, dict):
        out.write_text(json.dumps({**data, "meta": meta}, indent=1) + "\n")
    else:
        shutil.copyfile(raw, out)
    return out


def write_beside(raw: Path, meta: dict[str, str] | None = None) -> Path | None:
    """A script's output written into a raw/ folder: its summary one folder up. Output
    written anywhere else is left alone (summarize it later with --out-dir)."""
    raw = Path(raw)
    if raw.parent.name != "raw":
        return None
    return summarize_file(raw, raw.parent.parent, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("raw", nargs="+", type=Path, help="raw result files")
    ap.add_argument(
        "--out-dir", type=Path, default=None, help="default: the folder above each file's raw/"
    )
    ap.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE",
        help="recorded in the summary (gpu, commit, command...); repeatable",
    )  # fmt: skip
    a = ap.parse_args(argv)
    meta = dict(m.split("=", 1) for m in a.meta)
    for raw in a.raw:
        if raw.is_dir():
            continue
        if a.out_dir is None and raw.parent.name != "raw":
            ap.error(f"{raw} is not in a raw/ folder: pass --out-dir")
        out = summarize_file(raw, a.out_dir or raw.parent.parent, meta)
        if out is not None:
            print(f"{raw} -> {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
