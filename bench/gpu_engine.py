"""GPU, engine only (no services): W1 offline throughput and the decode step's CPU share.

On dummy Llama-3.1-8B (bf16), in one process:
  1. W1 (N requests, IN random tokens in / OUT out, ignore EOS, all at once) through LLMEngine:
     output tok/s, and per decode step the batch, the wall time and the decode roofline
     (weights + context KV bytes over the copy bandwidth measured in the same run);
  2. at a steady decode batch (--profile-batch), per step: wall time, GPU time (CUDA events
     around the runner), their difference (time the GPU waits on the host), with CUDA graphs
     and without; and a cProfile of the graph steps' host work;
  3. with --kernel-profile: torch.profiler over a few decode steps at that batch (CUDA graphs
     and eager) and over one 8k-token prefill step: GPU time per step by kernel kind (GEMM,
     attention, norm, ...) and the top kernels, so a step's time can be put against its
     compute and memory ceilings.

    PYTHONPATH=. python bench/gpu_engine.py --ceilings .carry/gpu_ceilings.py --out $OUT/engine.json
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

from bench.gpu_engine_tools import StepTimer, profiled, sync_device

CONFIG_DIR = Path(__file__).resolve().parents[1] / "tandem" / "configs" / "llama-3.1-8b"


def make_engine(args):
    from tandem.config import EngineConfig
    from tandem.engine import LLMEngine

    return LLMEngine(
        EngineConfig(
            model=str(args.config),
            dtype="bfloat16",
            load_format="dummy",
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
        )
    )


def triton_cache_entries() -> int:
    """Kernels Triton has compiled into its on-disk cache (one folder each): run with an
    empty TRITON_CACHE_DIR, the count that grows during a W1 run is what its traffic compiled."""
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for p in root.iterdir() if p.is_dir()) if root.is_dir() else 0


def weight_bytes(engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def kv_bytes_per_token(engine) -> int:
    return engine.runner.block_bytes // engine.runner.block_size


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    # the same draw as the HF peer script (.carry/hf_peers.py) with the same seed
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def run_w1(engine, args, seed: int | None = None) -> dict:
    """W1 in the engine alone. A second run on the same engine needs its own seed: the same
    prompts would come out of the prefix cache and skip the prefill."""
    from tandem.records import SamplingParams

    seed = args.seed if seed is None else seed

    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    # warm-up: compile the prefill kernels for the shapes W1 uses
    for i, p in enumerate(prompts(8, args.input_len, vocab, 99)):
        engine.add_request(f"warm{i}", p, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    timer = StepTimer(engine)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hits0 = engine.block_manager.num_hit_tokens
    for i, p in enumerate(prompts(args.requests, args.input_len, vocab, seed)):
        engine.add_request(f"w1-{i}", p, params)
    out_tokens = 0
    while engine.has_unfinished():
        out_tokens += sum(len(o.new_token_ids) for o in timer.step())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timer.close()
    wb, kvb = weight_bytes(engine), kv_bytes_per_token(engine)
    decode = [r for r in timer.records if r["decode_only"]]
    for r in decode:
        r["roofline_s"] = (wb + r["context_tokens"] * kvb) / (args.copy_gbs * 1e9)
    dec_wall = sum(r["wall_s"] for r in decode)
    slowest = sorted(timer.records, key=lambda r: -r["wall_s"])[:6]
    return {
        "slowest_steps": [
            {k: r[k] for k in ("batch", "tokens", "context_tokens", "wall_s", "gpu_s")}
            for r in slowest
        ],
        "triton_cache_entries_after": triton_cache_entries(),
        "seed": seed,
        "prefix_cache_hit_tokens": engine.block_manager.num_hit_tokens - hits0,
        "requests": args.requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "output_tokens": out_tokens,
        "seconds": seconds,
        "output_tok_s": out_tokens / seconds,
        "steps": len(timer.records),
        "decode_steps": len(decode),
        "prefill_or_mixed_s": sum(r["wall_s"] for r in timer.records if not r["decode_only"]),
        "decode_s": dec_wall,
        "max_decode_batch": max((r["batch"] for r in decode), default=0),
        "mean_decode_batch": statistics.mean(r["batch"] for r in decode) if decode else 0,
        # time-weighted: the roofline time of the decode steps over their measured time
        "decode_roofline_fraction": sum(r["roofline_s"] for r in decode) / dec_wall
        if dec_wall
        else None,
        "weight_bytes": wb,
        "kv_bytes_per_token": kvb,
    }


def steady_decode(engine, args) -> dict:
    """profile_batch requests decoding at once; per-step times with graphs (async scheduling,
    then synchronous steps), then eager (synchronous)."""
    from tandem.records import SamplingParams

    vocab = engine.model_cfg.vocab_size
    n = args.profile_batch
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i, p in enumerate(prompts(n, args.input_len, vocab, 7)):
        engine.add_request(f"prof-{i}", p, params)
    while len(engine.scheduler.running) < n or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    result = {"batch": n}
    graphs = engine.runner.graphs
    for mode in ("graphs_async", "graphs_sync", "eager_sync"):
        engine.runner.graphs = graphs if mode.startswith("graphs") else None
        engine.async_scheduling = mode.endswith("async")
        timer = StepTimer(engine)
        for _ in range(5):
            timer.step()
        timer.records.clear()
        timer._events.clear()
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            timer.step()
        total = time.perf_counter() - t0
        timer.close()
        if mode != "eager_sync":  # then the host's work under cProfile, timed apart
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.profile_steps):
                engine.step()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
            result[f"cprofile_top_{mode}"] = s.getvalue()
        recs = [r for r in timer.records if r["decode_only"]]
        wall = statistics.median(r["wall_s"] for r in recs)
        gpu = statistics.median(r["gpu_s"] for r in recs)
        cpu = statistics.median(r["wall_s"] - r["wait_s"] for r in recs)
        thread_cpu = [r["thread_cpu_s"] for r in recs]
        gpu_total = sum(r["gpu_s"] for r in recs)
        result[mode] = {
            "steps": len(recs),
            "step_wall_ms_p50": wall * 1e3,
            "step_gpu_ms_p50": gpu * 1e3,
            # host work of one engine.step() (everything but waiting for the sampled tokens)
            "host_cpu_ms_p50": cpu * 1e3,
            "host_cpu_fraction": cpu / wall,
            # the same from the thread's CPU clock (p50 and mean over the steps)
            "thread_cpu_ms_p50": statistics.median(thread_cpu) * 1e3,
            "thread_cpu_ms_mean": statistics.fmean(thread_cpu) * 1e3,
            "thread_cpu_fraction": statistics.median(thread_cpu) / wall,
            # the part of the steps' wall time the GPU sits idle, waiting for the host
            "gpu_idle_fraction": max(0.0, 1 - gpu_total / total),
            "tok_s": n * len(recs) / total,
        }
    engine.runner.graphs = graphs
    engine.async_scheduling = engine.runner.device.type == "cuda"
    for i in range(n):
        engine.abort(f"prof-{i}")
    while engine.has_unfinished():
        engine.step()
    return result


def _decode_batch(engine, n: int, input_len: int, tag: str) -> None:
    """n requests of input_len random tokens, stepped until every one is decoding."""
    from tandem.records import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i, p in enumerate(prompts(n, input_len, engine.model_cfg.vocab_size, 11)):
        engine.add_request(f"{tag}-{i}", p, params)
    running = engine.scheduler.running
    while len(running) < n or any(r.num_computed_tokens < r.num_prompt_tokens for r in running):
        engine.step()
    for _ in range(3):
        engine.step()


def kernel_profile(engine, args) -> dict:
    """Where a step's GPU time goes: decode at each --kernel-profile-batches size (graphs,
    then eager) and one prefill step of max_num_batched_tokens prompt tokens
    (max_num_batched_tokens / input_len fresh prompts)."""
    from tandem.records import SamplingParams

    result = {"context_tokens": args.input_len, "decode": {}}
    graphs = engine.runner.graphs
    for n in args.kernel_profile_batches:
        _decode_batch(engine, n, args.input_len, "kprof")
        one = {"graphs": profiled(engine, 5)}
        engine.runner.graphs = None
        engine.async_scheduling = False
        engine.step()  # drains the step in flight
        one["eager"] = profiled(engine, 5)
        engine.runner.graphs = graphs
        engine.async_scheduling = engine.runner.device.type == "cuda"
        result["decode"][str(n)] = one
        for i in range(n):
            engine.abort(f"kprof-{i}")
        while engine.has_unfinished():
            engine.step()
    k = max(1, args.max_num_batched_tokens // args.input_len)
    small = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for i, p in enumerate(prompts(k, args.input_len, engine.model_cfg.vocab_size, 12)):
        engine.add_request(f"kpre-{i}", p, small)
    result["prefill"] = profiled(engine, 1)
    result["prefill"]["prompt_tokens"] = k * args.input_len
    while engine.has_unfinished():
        engine.step()
    result["mixed"] = mixed_profile(engine, args, args.kernel_profile_batches[0], k)
    return result


def mixed_profile(engine, args, n: int, k: int) -> dict:
    """One mixed step, synchronous: n requests decoding plus k fresh prompts filling the rest
    of the token budget; the decode rows through the decode kernel (split) and, for the
    comparison, every row through one prefill-kernel call."""
    from tandem.records import SamplingParams

    vocab = engine.model_cfg.vocab_size
    _decode_batch(engine, n, args.input_len, "kmix")
    engine.async_scheduling = False
    engine.step()  # drains the step in flight
    small = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out = {"decode_rows": n, "new_prompts": k}
    for split in (True, False):
        engine.runner.inputs.split_mixed_attention = split
        tag = f"kmix-new-{int(split)}"
        for i, p in enumerate(prompts(k, args.input_len, vocab, 13 + split)):
            engine.add_request(f"{tag}-{i}", p, small)
        sync_device(engine)
        t0 = time.perf_counter()
        engine.step()
        sync_device(engine)
        wall = time.perf_counter() - t0
        for i in range(k):
            engine.abort(f"{tag}-{i}")
        for i, p in enumerate(prompts(k, args.input_len, vocab, 23 + split)):
            engine.add_request(f"{tag}-p-{i}", p, small)
        prof = profiled(engine, 1)
        prof["step_wall_ms_unprofiled"] = wall * 1e3
        out["split" if split else "one_prefill_call"] = prof
        for i in range(k):
            engine.abort(f"{tag}-p-{i}")
    engine.runner.inputs.split_mixed_attention = True
    engine.async_scheduling = engine.runner.device.type == "cuda"
    for i in range(n):
        engine.abort(f"kmix-{i}")
    while engine.has_unfinished():
        engine.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=CONFIG_DIR, help="dir of the config.json")
    ap.add_argument(
        "--kernel-profile", action="store_true", help="GPU time per step by kernel kind"
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--ceilings",
        required=True,
        help="path to the ceilings script (.carry/gpu_ceilings.py, carried): measured in this run",
    )
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--profile-batch", type=int, default=256)
    ap.add_argument("--profile-steps", type=int, default=40)
    ap.add_argument("--skip-w1", action="store_true")
    ap.add_argument("--w1-repeats", type=int, default=1, help="W1 runs, each on new prompts")
    ap.add_argument("--kernel-profile-batches", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--skip-steady", action="store_true")
    ap.add_argument(
        "--w1-unsplit",
        action="store_true",
        help="W1 again with mixed steps' decode rows in the prefill kernel (the old path)",
    )
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("gpu_ceilings", args.ceilings)
    ceilings_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceilings_mod)
    ceilings = ceilings_mod.measure()
    args.copy_gbs = ceilings["copy_GBps_read_plus_write"]
    print("CEILINGS", json.dumps(ceilings), flush=True)
    t0 = time.perf_counter()
    engine = make_engine(args)
    out = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "dummy Llama-3.1-8B bf16",
        "startup_s": time.perf_counter() - t0,
        "triton_cache_entries_after_startup": triton_cache_entries(),
        "num_blocks": engine.runner.num_blocks,
        "graph_sizes": engine.runner.graphs.sizes if engine.runner.graphs else [],
        "ceilings": ceilings,
    }
    print(json.dumps(out), flush=True)
    with torch.inference_mode():
        if args.kernel_profile:
            out["kernel_profile"] = kernel_profile(engine, args)
            print("KERNELS", json.dumps(out["kernel_profile"]), flush=True)
        if not args.skip_steady:
            out["steady_decode"] = steady_decode(engine, args)
            sd = out["steady_decode"]
            print(json.dumps({k: v for k, v in sd.items() if not k.startswith("cprofile")}))
            print(sd.get("cprofile_top_graphs_async", ""), flush=True)
        if not args.skip_w1:
            out["w1_engine"] = run_w1(engine, args)
            print(json.dumps(out["w1_engine"]), flush=True)
            for i in range(1, args.w1_repeats):  # new prompts each time: no prefix-cache hits
                out[f"w1_engine_repeat{i}"] = run_w1(engine, args, args.seed + 10 + i)
                print(f"REPEAT{i}", json.dumps(out[f"w1_engine_repeat{i}"]), flush=True)
        if args.w1_unsplit:  # W1 with every mixed step's rows in one prefill call, then
            # split again: new prompts each time (no prefix-cache hits), and a split run on
            # either side of the unsplit one for the spread
            engine.runner.inputs.split_mixed_attention = False
            out["w1_engine_unsplit"] = run_w1(engine, args, args.seed + 1)
            engine.runner.inputs.split_mixed_attention = True
            print("UNSPLIT", json.dumps(out["w1_engine_unsplit"]), flush=True)
            out["w1_engine_split_again"] = run_w1(engine, args, args.seed + 2)
            print("SPLIT2", json.dumps(out["w1_engine_split_again"]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
