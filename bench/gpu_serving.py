"""GPU serving benchmarks through the real stack (gateway -> router -> workers), one device call.

    python -m bench.gpu_serving w1 --out $OUT/raw --peers .carry/hf_peers.py \
        --ceilings .carry/gpu_ceilings.py --tokenizer-from .carry/smollm2-tokenizer
    python -m bench.gpu_serving w2 --out $OUT/raw --rates 2,8,16,32 ...

w1: the ceilings, then `tandem serve` (aggregated) on dummy Llama-3.1-8B and `tandem bench` W1
    (512 x 512 in / 256 out, all at once, ignore EOS), then HF transformers' peers
    (--peers: the script carried to the GPU machine) in the same call.
w2: for each mode (aggregated, disaggregated on the one GPU), `tandem serve`, then W2 at each
    Poisson rate (1024 in / 128 out), TTFT/TPOT/ITL/E2EL percentiles and goodput.
Each step's raw JSON lands in --out (bench.summarize makes the committed summaries); a summary
line per step goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.dummy_model_dir import make_dummy_model_dir
from bench.metrics import merge_results
from bench.processes import run_bench_processes

ROOT = Path(__file__).resolve().parents[1]

# bench_clients: each client loads the tokenizer and the first runs its warm-ups before this
CLIENT_START_S = 25.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`tandem serve` as a child process; stops the whole process group on exit."""

    def __init__(self, model_dir: Path, mode: str, log_path: Path, extra: list[str]) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "tandem_cli.main", "serve", str(model_dir), "--mode", mode]
        cmd += ["--load-format", "dummy", "--port", str(self.port), *extra]
        if mode == "disaggregated":
            cmd += ["--prefill", "1"]
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tandem serve exited: see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError("tandem serve did not come up")
        self.startup_s = 600 - (deadline - time.monotonic())

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def bench(url: str, result: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench", "--base-url", url, "--disable-tqdm"]
    cmd += ["--result-file", str(result), *args]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def bench_clients(
    url: str,
    result: Path,
    args: list[str],
    num_prompts: int,
    n: int,
    seed: int,
    warmups: int,
    start_s: float = CLIENT_START_S,
) -> dict:
    """`tandem bench` in n processes started together (bench.processes), merged
    into one result file."""
    results, start_at = run_bench_processes(
        url, args, num_prompts, n, seed, result.parent, result.stem, start_s, warmups
    )
    merged = merge_results(results)
    # a client still loading or warming up at start_at began late: its share ran after the rest
    merged["summary"]["client_start_spread_s"] = max(r["t0_unix"] for r in results) - start_at
    result.write_text(json.dumps(merged))
    return merged


def summary(res: dict) -> dict:
    s = res.get("summary", res)
    keys = [k for k in s if not isinstance(s[k], (list, dict))]
    return {k: s[k] for k in keys}


def measure_ceilings(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("gpu_ceilings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.measure()


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The engine settings of W1/W2 (read back by engine_flags)."""
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)


def engine_flags(a) -> list[str]:
    return [
        "--max-num-seqs",
        str(a.max_num_seqs),
        "--max-num-batched-tokens",
        str(a.max_num_batched_tokens),
        "--max-model-len",
        str(a.max_model_len),
    ]


def run_w1(a, model_dir: Path, out: Path) -> None:
    ceilings = measure_ceilings(a.ceilings)
    print("CEILINGS", json.dumps(ceilings), flush=True)
    (out / "ceilings.json").write_text(json.dumps(ceilings))
    extra = engine_flags(a) + a.serve_extra.split()
    serve = Serve(model_dir, "aggregated", out / f"serve-w1{a.tag}.log", extra)
    try:
        # the server names no local paths: the clients get the tokenizer from here
        w1_args = ["--tokenizer", str(model_dir), "--dataset-name", "random"]
        w1_args += ["--random-input-len", "512"]
        w1_args += ["--random-output-len", "256", "--request-rate", "inf"]
        if a.bench_extra:
            w1_args += ["--extra-body", a.bench_extra]
        path = out / f"w1-aggregated{a.tag}.json"
        if a.num_clients > 1:
            res = bench_clients(serve.url, path, w1_args, a.requests, a.num_clients, 1, 8)
        else:
            w1_args += ["--num-prompts", str(a.requests), "--num-warmups", "8", "--seed", "1"]
            res = bench(serve.url, path, w1_args)
        print("W1", json.dumps(summary(res)), f"startup_s={serve.startup_s:.0f}", flush=True)
    finally:
        serve.stop()
    if a.peers:
        peers = subprocess.run(
            [sys.executable, a.peers, "--requests", str(a.requests), "--peers", a.peer_kinds],
            capture_output=True,
            text=True,
        )
        print(peers.stdout[-3000:], peers.stderr[-2000:], flush=True)
        (out / "hf-peers.txt").write_text(peers.stdout + "\n" + peers.stderr[-5000:])


def run_w2(a, model_dir: Path, out: Path) -> None:
    rates = [float(r) for r in a.rates.split(",")]
    runs = []
    for mode in a.modes.split(","):
        serve = Serve(model_dir, mode, out / f"serve-w2-{mode}.log", engine_flags(a))
        try:
            for rate in rates:
                n = max(32, int(rate * a.seconds_per_rate))
                w2 = ["--tokenizer", str(model_dir), "--dataset-name", "random"]
                w2 += ["--num-prompts", str(n)]
                w2 += ["--random-input-len", "1024", "--random-output-len", "128"]
                # a seed per rate: the same server must not see the last run's prompts again
                # (its prefix cache would serve them)
                seed = str(100 + rates.index(rate))
                w2 += ["--request-rate", str(rate), "--num-warmups", "4", "--seed", seed]
                w2 += ["--goodput", "ttft:400", "tpot:40", "--percentiles", "50,90,99"]
                w2 += ["--metadata", f"mode={mode}", f"rate={rate}"]
                path = out / f"w2-{mode}-rate{rate:g}.json"
                res = bench(serve.url, path, w2)
                path.unlink()  # all runs go into one file below
                runs.append({"mode": mode, "rate": rate, "result": res})
                print("W2", mode, rate, json.dumps(summary(res)), flush=True)
        finally:
            serve.stop()
        (out / "w2.json").write_text(json.dumps(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["w1", "w2"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ceilings", default=".carry/gpu_ceilings.py")
    ap.add_argument("--peers", default=None, help="path to hf_peers.py (w1)")
    ap.add_argument("--peer-kinds", default="static,cb")
    ap.add_argument("--config", type=Path, default=ROOT / "tandem" / "configs" / "llama-3.1-8b")
    ap.add_argument("--tokenizer-from", type=Path, default=Path(".carry/smollm2-tokenizer"))
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--serve-extra", default="", help="more `tandem serve` flags (w1)")
    ap.add_argument("--tag", default="", help="suffix of the w1 result and log file names")
    ap.add_argument(
        "--bench-extra", default="", help="w1: JSON object merged into every request body"
    )
    ap.add_argument(
        "--num-clients", type=int, default=1, help="w1: `tandem bench` processes, merged"
    )
    ap.add_argument("--rates", default="2,8,16,32")
    ap.add_argument("--modes", default="aggregated,disaggregated")
    ap.add_argument("--seconds-per-rate", type=float, default=15.0)
    add_engine_args(ap)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = make_dummy_model_dir(a.config, a.tokenizer_from, Path("/tmp/tandem-dummy-model"))
    (run_w1 if a.phase == "w1" else run_w2)(a, model_dir, a.out)


if __name__ == "__main__":
    main()
