"""The control-plane ceiling: streamed tokens/s that the gateway + router sustain when the
engine costs nothing (FAKE workers emit tokens as fast as the streams take them).

    fake decode server(s) --gRPC--> router --gRPC--> gateway --HTTP/SSE--> tandem bench
    (bench.fake_worker)  (real)           (real)                 (client processes)

The load comes from --num-clients `tandem bench` processes that start together (--start-at)
and share the streams; their records are merged, so throughput is all output tokens over
first send -> last finish. Per process the script reports the CPU it used during the run
(share of one core, µs per streamed token): a process near 1.0 of a core is the bottleneck,
and µs/token is what that hop costs. --profile repeats the run while py-spy samples the router
and the gateway (--nonblocking) and adds each one's top functions (self and total %).

    python -m bench.control_plane                 # 256 streams x 1024 tokens, 1 decode
    python -m bench.control_plane --profile --out bench/results/raw/control-plane-cpu.json
    python -m bench.control_plane --modes lockstep,interval4,coalesce   # three, one JSON

The result JSON goes to bench/results/raw/ (git-ignored) and its summary (bench.summarize)
one folder up, unless --out names a file outside a raw/ folder.

The fake decode server makes each step (one token per stream) only when the router's session
took the last one (the worst case for the router: every message carries one token per
stream, every hop after it one message per token). With --worker-coalesce it behaves like the
real decode server instead: its "engine" steps on its own clock (--itl-ms per step; 0: as fast
as its event loop turns) and a lagging session gets all the steps made meanwhile in one
message. --stream-interval N is passed to the router.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.fake_stack import FakeStack
from bench.metrics import merge_results
from bench.processes import run_bench_processes
from bench.summarize import write_beside

ROOT = Path(__file__).resolve().parent.parent

_FRAME = re.compile(r"^(.*) \((?:.*/)?([^/]*?)(?::\d+)?\)$")  # "fn (/a/b.py:12)" -> fn, b.py
# Where a sample's innermost frame lives (py-spy --native names the file of C frames too).
_TANDEM = r"^(router|gateway|tandem|protos|decode_service|prefill_service|kvtransfer)/"
_WAITING = re.compile(
    r"^(epoll_p?wait|e?poll|ppoll|select|pthread_cond_\w*wait|futex\w*|\w*nanosleep) "
)
_AREAS = [
    ("syscalls/libc", r"^(libc\.so|ld-linux|\[vdso\])"),
    ("gRPC", r"^grpc/|cygrpc"),
    ("protobuf", r"_message\.abi3|^google/protobuf/"),
    ("tokenizers", r"^tokenizers/|tokenizers\.abi3"),
    ("HTTP", r"^(uvicorn|starlette|fastapi|h11|anyio|httptools|httpx|httpcore)/"),
    ("JSON", r"^json/|_json\.c"),
    (
        "event loop",
        r"^(asyncio|uvloop)/|loop\.c|_asynciomodule|core\.c|loop-watcher|queue\.h|linux\.c",
    ),
    ("tandem code", _TANDEM),
    ("Python runtime", r"libpython|\.h$|\.c$|^<"),
]
CLIENT_STARTUP_S = 6.0  # imports + dataset before the common start time
# --modes presets (the settings they change):
#   lockstep   the fake decode makes each step when the session takes the last one: one
#              token per stream per message (the worst case; the default)
#   interval4  the same, the router sending at most every 4 tokens (--stream-interval 4)
#   coalesce   the fake decode steps on its own clock as fast as it can and merges what a
#              lagging stream queued, as the real decode server does
MODES = {
    "lockstep": {},
    "interval4": {"stream_interval": 4},
    "coalesce": {"worker_coalesce": True},
    # the internal plane without and with mutual TLS + role checks (what `tandem serve` runs)
    "plaintext": {"internal_auth": "none"},
    "mtls": {"internal_auth": "mtls"},
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
    }


def client_flags(args) -> list[str]:
    """`tandem bench` flags of every client (prompt count, seed, warm-ups: per client)."""
    flags = [
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--endpoint-type", args.endpoint_type, "--tokenizer", str(args.model),
    ]  # fmt: skip
    if args.max_concurrency:
        flags += ["--max-concurrency", str(max(1, args.max_concurrency // args.num_clients))]
    return flags


def merge(results: list[dict]) -> dict:
    """Summaries of several client processes' records as one run (one time base)."""
    s = merge_results(results)["summary"]
    peak = s["max_concurrency_reached"]
    keys = (
        "completed failed duration_s total_output_tokens output_throughput request_throughput "
        "mean_ttft_ms p99_ttft_ms mean_tpot_ms mean_itl_ms median_itl_ms p99_itl_ms "
        "mean_tokens_per_chunk output_len_mismatches"
    ).split()
    out = {k: s[k] for k in keys}
    out["max_concurrency_reached_sum_of_clients"] = peak
    return out


def run_clients(args, stack: FakeStack, tmp: Path, tag: str, on_start=None) -> dict:
    """One measured run; on_start(start_at) runs right after the clients are spawned."""
    before = {name: cpu_seconds(p.pid) for name, p in stack.procs.items()}
    results, _ = run_bench_processes(
        stack.base_url, client_flags(args), args.num_prompts, args.num_clients, args.seed,
        tmp, tag, CLIENT_STARTUP_S, on_start=on_start,
    )  # fmt: skip
    summary = merge(results)
    wall = summary["duration_s"]
    tokens = max(1, summary["total_output_tokens"])

    def usage(cpu_s: float) -> dict:
        return {
            "cpu_s": round(cpu_s, 3),
            "share_of_one_core": round(cpu_s / wall, 3),
            "us_per_token": round(cpu_s / tokens * 1e6, 2),
        }

    cpu = {name: usage(cpu_seconds(p.pid) - before[name]) for name, p in stack.procs.items()}
    for i, r in enumerate(results):
        cpu[f"client-{i}"] = usage(r["summary"]["client_cpu_s"])
    return {"summary": summary, "cpu": cpu}


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def top_functions(raw: Path, n: int = 15) -> dict:
    """py-spy --format raw (collapsed stacks) -> top functions by self and by total samples."""
    self_s: collections.Counter = collections.Counter()
    total_s: collections.Counter = collections.Counter()
    areas: collections.Counter = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        samples += c
        raw_frames = stack.split(";")
        frames = [_FRAME.sub(r"\1 (\2)", f) for f in raw_frames]
        self_s[frames[-1]] += c
        leaf_file = raw_frames[-1].rpartition(" (")[2].rstrip(")")
        if _WAITING.match(raw_frames[-1]):
            areas["waiting (epoll, futex)"] += c  # blocked in the kernel, not using CPU
        else:
            areas[next((a for a, rx in _AREAS if re.search(rx, leaf_file)), "other")] += c
        # inclusive time of tandem's own functions (the outer frames would top any list)
        for raw_f, f in set(zip(raw_frames, frames, strict=True)):
            name, _, where = raw_f.rpartition(" (")
            if re.search(_TANDEM, where) and name not in ("<module>", "main", "run"):
                total_s[f] += c

    def pct(counter):
        return [[f, round(100 * c / max(samples, 1), 1)] for f, c in counter.most_common(n)]

    return {
        "samples": samples,
        "self_pct_by_area": pct(areas),
        "self_pct": pct(self_s),
        "tandem_code_total_pct": pct(total_s),
    }


def profiled_run(args, stack: FakeStack, tmp: Path) -> dict:
    """Repeat the run while py-spy samples the router and the gateway."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy not found"}
    spies = {}

    def start_spies(start_at: float) -> None:
        time.sleep(max(0.0, start_at - time.time()) + 1.0)  # into the steady state
        for name in ("router", "gateway"):
            out = tmp / f"profile-{name}.txt"
            cmd = [exe, "record", "--pid", str(stack.pid(name)), "--rate", "100"]
            # --native (C frames: gRPC core, syscalls) pauses the process at each sample
            cmd += ["--native"] if args.profile_native else ["--nonblocking"]
            cmd += ["--format", "raw", "--output", str(out)]
            cmd += ["--duration", str(args.profile_seconds)]
            spies[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL), out)

    run = run_clients(args, stack, tmp, "profiled", on_start=start_spies)
    profiles = {}
    for name, (proc, out) in spies.items():
        proc.wait(timeout=args.profile_seconds + 60)
        profiles[name] = top_functions(out) if out.exists() else {"error": "no profile written"}
    return {"run": run, "profiles": profiles}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir for the router's tokenizer")
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--num-prefill", type=int, default=0, help="0: aggregated (no prefill hop)")
    p.add_argument("--num-routers", type=int, default=1, help="as tandem serve --routers")
    p.add_argument("--num-gateways", type=int, default=1, help="as tandem serve --gateways")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--max-concurrency", type=int, default=None, help="over all clients")
    p.add_argument("--endpoint-type", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--num-clients", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
        help="bench client processes sharing the streams (default: cores / 4, 1 to 4)",
    )  # fmt: skip
    p.add_argument("--num-warmups", type=int, default=8)
    p.add_argument("--itl-ms", type=float, default=0.0, help="fake decode: ms per token (step)")
    p.add_argument(
        "--worker-coalesce", action="store_true",
        help="fake decode steps on its own clock and merges what a lagging stream queued",
    )  # fmt: skip
    p.add_argument("--stream-interval", type=int, default=1, help="router --stream-interval")
    p.add_argument(
        "--modes", default="",
        help=f"comma list of presets run one after another, each on a fresh stack: {MODES}",
    )  # fmt: skip
    p.add_argument(
        "--internal-auth", choices=["none", "mtls"], default="none",
        help="internal gRPC: plaintext, or mutual TLS with role certificates (as tandem serve)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="measured runs (the spread is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="one more run under py-spy")
    p.add_argument("--profile-seconds", type=int, default=15)
    p.add_argument(
        "--no-profile-native", dest="profile_native", action="store_false",
        help="Python frames only, without pausing the processes (C time shows as Runner.run)",
    )  # fmt: skip
    p.add_argument("--note", default="", help="free text stored with the result")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/raw/...)")
    args = p.parse_args()
    if args.model is None:
        from tandem.loader.default_model import resolve_model_dir

        args.model = str(resolve_model_dir(None))
    info = machine()
    if args.modes:
        names = args.modes.split(",")
        unknown = [n for n in names if n not in MODES]
        if unknown:
            p.error(f"unknown mode(s) {unknown}; known: {sorted(MODES)}")
        results = {}
        for name in names:
            print(f"mode {name}: {MODES[name]}")
            results[name] = measure(argparse.Namespace(**{**vars(args), **MODES[name]}), info)
        result = {"what": results[names[0]]["what"], "date": results[names[0]]["date"]}
        result |= {"machine": info, "note": args.note, "modes": results}
        rates = {n: r["output_tok_per_s"]["runs"] for n, r in results.items()}
    else:
        result = measure(args, info)
        rates = result["output_tok_per_s"]
    default = f"control-plane-{info['cores']}cores-{result['date']}.json"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "raw" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(rates), f"-> {out}")
    write_beside(out)


def measure(args, info: dict) -> dict:
    """A fresh stack, warm-up, args.repeats measured runs (and a profiled one)."""
    # (only when set: a router from before the flag still runs the default)
    router_args = (
        ("--stream-interval", str(args.stream_interval)) if args.stream_interval > 1 else ()
    )
    with FakeStack(
        args.model, args.num_decode, args.num_prefill, itl_ms=args.itl_ms,
        coalesce=args.worker_coalesce, router_args=router_args,
        num_routers=args.num_routers, num_gateways=args.num_gateways,
        internal_auth=args.internal_auth,
    ) as stack:  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if args.num_warmups:
                run_bench_processes(
                    stack.base_url, client_flags(args), args.num_warmups, 1, 10**6, tmp,
                    "warm", 0.0,
                )  # fmt: skip
            runs = []
            for k in range(args.repeats):
                runs.append(run_clients(args, stack, tmp, f"run{k}"))
                rate = runs[-1]["summary"]["output_throughput"]
                per_chunk = runs[-1]["summary"]["mean_tokens_per_chunk"]
                shares = {n: c["share_of_one_core"] for n, c in runs[-1]["cpu"].items()}
                print(
                    f"run {k}: {rate:.0f} output tok/s, {per_chunk:.2f} tokens per SSE chunk;"
                    f" CPU share of one core {shares}"
                )
            profile = profiled_run(args, stack, tmp) if args.profile else None
    rates = [r["summary"]["output_throughput"] for r in runs]
    return {
        "what": "control-plane ceiling: fake workers -> real router -> real gateway -> bench",
        "date": datetime.date.today().isoformat(),
        "machine": info,
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        "output_tok_per_s": {
            "runs": [round(r, 1) for r in rates],
            "min": min(rates),
            "max": max(rates),
        },  # fmt: skip
        "runs": runs,
        "profile": profile,
    }


if __name__ == "__main__":
    main()
