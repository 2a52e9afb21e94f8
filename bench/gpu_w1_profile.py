"""W1 through the stack with py-spy on every process during the decode phase: where the time
goes in the decode server (engine thread vs event loop, GIL waits), the router and the gateway.

    PYTHONPATH=. python bench/gpu_w1_profile.py --out $OUT [--serve-extra "..."] [--at-s 12]

Starts `tandem serve` (aggregated, dummy Llama-3.1-8B), runs `tandem bench` W1 in the
background, and at --at-s seconds records each server process for --seconds with py-spy
(`--threads --idle --nonblocking`, raw collapsed stacks; and `--gil`: only the thread holding
the GIL). Then it prints, per process and thread, the share of samples by top frame group.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_serving import Serve, add_engine_args, bench, engine_flags, summary  # noqa: E402


def children_by_role(root_pid: int) -> dict[str, int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines()[1:]:
        pid, ppid, cmd = line.split(None, 2)
        procs[int(pid)] = (int(ppid), cmd)
    roles = {}
    for pid, (_, cmd) in procs.items():
        for role in ("decode", "prefill", "router", "gateway"):
            if f"tandem_cli.main {role}" in cmd or f"tandem {role}" in cmd:
                roles.setdefault(role, pid)
        if "bench" in cmd and "--base-url" in cmd:
            roles.setdefault("client", pid)
    return roles


def record(pid: int, path: Path, seconds: float, gil: bool) -> subprocess.Popen:
    cmd = ["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw"]
    cmd += ["-o", str(path), "--threads", "--nonblocking"]
    cmd += ["--gil"] if gil else ["--idle"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def digest(path: Path, top: int = 14) -> dict:
    """Collapsed stacks -> per thread: samples and the heaviest leaf-side frames."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        n = int(n)
        totals[thread] += n
        # the innermost tandem/grpc/asyncio/torch-level frame, with its caller
        leaf = ";".join(f.split(" (")[0] for f in frames[-2:])
        threads[thread][leaf] += n
    return {
        t: {"samples": totals[t], "top": threads[t].most_common(top)}
        for t in sorted(totals, key=totals.get, reverse=True)[:6]
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "tandem" / "configs" / "llama-3.1-8b")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tandem-dummy-model"))
    ap.add_argument("--serve-extra", default="")
    ap.add_argument("--at-s", type=float, default=11.0, help="start recording this late")
    ap.add_argument("--seconds", type=int, default=4)
    add_engine_args(ap)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    extra = engine_flags(a) + a.serve_extra.split()
    serve = Serve(a.model_dir, "aggregated", Path("/tmp/serve-w1-profile.log"), extra)
    result: dict = {}
    try:
        args = ["--tokenizer", str(a.model_dir), "--dataset-name", "random", "--num-prompts", "512"]
        args += ["--random-input-len", "512", "--random-output-len", "256"]
        args += ["--request-rate", "inf", "--num-warmups", "8", "--seed", "1"]
        done = threading.Event()

        def run() -> None:
            result["w1"] = bench(serve.url, Path("/tmp/w1-profile.json"), args)
            done.set()

        threading.Thread(target=run, daemon=True).start()
        time.sleep(a.at_s)
        roles = children_by_role(serve.proc.pid)
        procs = []
        for role, pid in roles.items():
            for gil in (False, True):
                path = a.out / f"pyspy-{role}{'-gil' if gil else ''}.txt"
                procs.append((role, gil, path, record(pid, path, a.seconds, gil)))
        for _, _, _, p in procs:
            p.wait(timeout=a.seconds + 60)
        done.wait(timeout=300)
    finally:
        serve.stop()
    report = {"w1": summary(result["w1"]) if "w1" in result else None, "roles": {}}
    for role, gil, path, p in procs:
        key = f"{role}{'-gil' if gil else ''}"
        report["roles"][key] = digest(path)
        if p.returncode:
            report["roles"][key + "-error"] = p.stderr.read()[-500:]
    (a.out / "w1-profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["w1"])[:600])
    for key, threads in report["roles"].items():
        print("==", key)
        if isinstance(threads, str):
            print(threads)
            continue
        for t, d in threads.items():
            print(f"  {t}: {d['samples']} samples")
            for leaf, n in d["top"][:8]:
                print(f"     {n:6d} {leaf[-150:]}")


if __name__ == "__main__":
    main()
