"""One benchmark run from several `tandem bench` processes.

One asyncio client process cannot read the SSE events of hundreds of fast streams (512 streams
at a 25 ms step are ~20k events a second): a client that lags measures its own delay as the
server's. The processes start their requests together at one wall-clock time (--start-at);
bench.metrics.merge_results puts their records on one clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def run_bench_processes(
    base_url: str,
    flags: Sequence[str],
    num_prompts: int,
    num_clients: int,
    seed: int,
    out_dir: Path,
    tag: str,
    start_in_s: float,
    warmups: int = 0,
    on_start: Callable[[float], None] | None = None,
) -> tuple[list[dict], float]:
    """Run `tandem bench BASE_URL FLAGS` in num_clients processes, the prompts split between
    them, client i seeded seed + i, the first one running the warm-ups; all start sending at
    now + start_in_s (enough for imports, the tokenizer and the warm-ups). on_start(start_at)
    runs once they are spawned. Returns their result files' contents and start_at."""
    shares = [
        num_prompts // num_clients + (i < num_prompts % num_clients) for i in range(num_clients)
    ]
    start_at = time.time() + start_in_s
    outs = [out_dir / f"{tag}-client{i}.json" for i in range(num_clients)]
    procs = []
    for i, (share, out) in enumerate(zip(shares, outs, strict=True)):
        cmd = [sys.executable, "-m", "bench", "--base-url", base_url, "--disable-tqdm"]
        cmd += ["--result-file", str(out), *flags, "--num-prompts", str(share)]
        cmd += ["--seed", str(seed + i), "--num-warmups", str(warmups if i == 0 else 0)]
        cmd += ["--start-at", f"{start_at:.3f}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    if on_start is not None:
        on_start(start_at)
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a bench client exited with {p.returncode}")
    results = [json.loads(o.read_text()) for o in outs]
    for o in outs:
        o.unlink()
    return results, start_at
