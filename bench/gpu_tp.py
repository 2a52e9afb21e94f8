"""GPU (2 GPUs): tensor parallelism on dummy Llama-3.1-8B, TP=1 vs TP=2, in one call.

  1. greedy equality (fp32): 8 prompts x 32 tokens through LLMEngine at TP=1 (CUDA graphs, the
     default) and at TP=2 eager and TP=2 with CUDA graphs (NCCL all-reduces captured); dummy
     weights are drawn per tensor name, so both sizes build the same model. Also the largest
     top-1 logprob difference.
  2. W1-style engine throughput (bf16): N random-token requests IN in / OUT out, ignore EOS,
     all at once, output tok/s at TP=1 and TP=2.

Each configuration runs in its own process (one engine per process; its ranks, process group
and GPU memory go with it), under a time limit, so one failure (say, a graph capture) is
reported without losing the others.

    PYTHONPATH=. python bench/gpu_tp.py --out $OUT/tp.json     # about 5-7 min; or in two
    PYTHONPATH=. python bench/gpu_tp.py --only greedy --out $OUT/tp-greedy.json
    PYTHONPATH=. python bench/gpu_tp.py --only w1 --out $OUT/tp-w1.json

The same logic on CPU (gloo) with a tiny config, to check the script itself:

    PYTHONPATH=. python bench/gpu_tp.py --device cpu --config DIR --requests 8 --input-len 16 \
        --output-len 8 --prompt-lens 3,9 --greedy-tokens 8 --out /tmp/tp.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "tandem" / "configs" / "llama-3.1-8b"
PROMPT_LENS = "7,33,64,100,128,250,301,512"  # as bench/gpu_model_parity.py


def _engine(job: dict):
    from tandem.config import EngineConfig
    from tandem.engine import LLMEngine

    return LLMEngine(EngineConfig(model=job["config"], load_format="dummy", **job["engine"]))


def _random_prompts(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def run_greedy(job: dict) -> dict:
    from tandem.records import SamplingParams

    t0 = time.perf_counter()
    engine = _engine(job)
    ready_s = time.perf_counter() - t0
    prompts = _random_prompts(job["prompt_lens"], engine.model_cfg.vocab_size, 0)
    params = SamplingParams(temperature=0, max_tokens=job["tokens"], ignore_eos=True, logprobs=0)
    reqs = [engine.add_request(f"g{i}", p, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    out = {
        "ready_s": ready_s,
        "tokens": [r.output_token_ids for r in reqs],
        "logprobs": [[lp.logprob for lp in r.logprobs] for r in reqs],
        "graphs": engine.runner.graphs is not None,
    }
    engine.shutdown()
    return out


def run_w1(job: dict) -> dict:
    from tandem.records import SamplingParams

    t0 = time.perf_counter()
    engine = _engine(job)
    ready_s = time.perf_counter() - t0
    vocab = engine.model_cfg.vocab_size
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, p in enumerate(_random_prompts([job["input_len"]] * 8, vocab, 99)):
        engine.add_request(f"warm{i}", p, warm)
    while engine.has_unfinished():
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=job["output_len"], ignore_eos=True)
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for i, p in enumerate(_random_prompts([job["input_len"]] * job["requests"], vocab, 1)):
        engine.add_request(f"w1-{i}", p, params)
    out_tokens = steps = 0
    while engine.has_unfinished():
        out_tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
    sync()
    seconds = time.perf_counter() - t0
    out = {
        "ready_s": ready_s,
        "num_blocks": engine.runner.num_blocks,
        "output_tokens": out_tokens,
        "steps": steps,
        "seconds": seconds,
        "output_tok_s": out_tokens / seconds,
    }
    engine.shutdown()
    return out


def _child(job: dict, timeout_s: float) -> dict:
    """Run one job in a fresh process; its result, or what went wrong."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--job", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # its TP ranks die with it (PR_SET_PDEATHSIG)
        tail = (e.stderr or b"")[-2000:]
        return {"error": f"timed out after {timeout_s:.0f}s", "stderr_tail": str(tail)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_s"] = time.perf_counter() - t0
    return result


def _compare(ref: dict, got: dict) -> dict:
    if "error" in ref or "error" in got:
        return {"equal": None, "error": got.get("error") or ref.get("error")}
    same = [a == b for a, b in zip(ref["tokens"], got["tokens"], strict=True)]
    diffs = [
        abs(x - y)
        for a, b, ok in zip(ref["logprobs"], got["logprobs"], same, strict=True)
        if ok
        for x, y in zip(a, b, strict=True)
    ]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(ref["tokens"], got["tokens"], strict=True)
    ]
    return {
        "equal": all(same),
        "prompts_equal": f"{sum(same)}/{len(same)}",
        "first_differing_step": first_diff,
        "max_abs_logprob_diff": max(diffs, default=None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job, print RESULT
    ap.add_argument("--out", help="where to write the JSON results")
    ap.add_argument("--config", default=str(CONFIG_DIR), help="model dir (config.json)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tp", type=int, default=2, help="the TP size compared with TP=1")
    ap.add_argument("--prompt-lens", default=PROMPT_LENS)
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--only", choices=["greedy", "w1"], default=None, help="run one part")
    ap.add_argument("--job-timeout", type=float, default=240.0, help="seconds per process")
    a = ap.parse_args()
    if a.job:
        job = json.loads(a.job)
        result = (run_greedy if job["kind"] == "greedy" else run_w1)(job)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not a.out:
        ap.error("--out is required")
    if a.device.startswith("cuda") and torch.cuda.device_count() < a.tp:
        raise SystemExit(
            f"bench/gpu_tp.py needs {a.tp} GPUs for TP={a.tp}; this machine has "
            f"{torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES)"
        )
    lens = [int(x) for x in a.prompt_lens.split(",")]
    greedy_engine = {
        "device": a.device,
        "dtype": "float32",  # near-ties of dummy weights would flip on bf16 rounding
        "num_blocks": 1024,
        "max_model_len": 1024,
        "max_num_batched_tokens": 4096,
        "cuda_graph_max_batch_size": 16,
    }
    results: dict = {"config": a.config, "device": a.device, "tp": a.tp}
    if a.device.startswith("cuda"):
        results["gpus"] = [torch.cuda.get_device_name(i) for i in range(a.tp)]
    runs = {
        "tp1": {"tensor_parallel_size": 1},
        f"tp{a.tp}_eager": {"tensor_parallel_size": a.tp, "enforce_eager": True},
        f"tp{a.tp}_graphs": {"tensor_parallel_size": a.tp},
    }
    if a.only != "w1":
        greedy = {}
        for name, extra in runs.items():
            job = {"kind": "greedy", "config": a.config, "prompt_lens": lens}
            job |= {"tokens": a.greedy_tokens, "engine": greedy_engine | extra}
            greedy[name] = _child(job, a.job_timeout)
            print(f"greedy {name}: {_summary(greedy[name])}", flush=True)
        results["greedy"] = {
            name: _compare(greedy["tp1"], r)
            | {"ready_s": r.get("ready_s"), "graphs": r.get("graphs")}
            for name, r in greedy.items()
            if name != "tp1"
        }
    if a.only != "greedy":
        w1_engine = {
            "device": a.device,
            "dtype": "bfloat16" if a.device.startswith("cuda") else "float32",
            "max_num_seqs": 512,
            "max_num_batched_tokens": 8192,
            "max_model_len": 2048,
        }
        results["w1"] = {}
        for tp in (1, a.tp):
            job = {"kind": "w1", "config": a.config, "requests": a.requests}
            job |= {"input_len": a.input_len, "output_len": a.output_len}
            job["engine"] = w1_engine | {"tensor_parallel_size": tp}
            results["w1"][f"tp{tp}"] = r = _child(job, a.job_timeout)
            print(f"w1 tp{tp}: {_summary(r)}", flush=True)
        one, many = results["w1"]["tp1"], results["w1"][f"tp{a.tp}"]
        if "output_tok_s" in one and "output_tok_s" in many:
            results["w1"][f"tp{a.tp}_over_tp1"] = many["output_tok_s"] / one["output_tok_s"]
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "gpus"}, indent=2))
    ok = all(v.get("equal") for v in results.get("greedy", {}).values())
    ok = ok and not any("error" in r for r in results.get("w1", {}).values() if isinstance(r, dict))
    raise SystemExit(0 if ok else 1)


def _summary(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}: {r.get('stderr_tail', '')[-600:]}"
    keys = ("ready_s", "wall_s", "output_tok_s", "num_blocks", "graphs")
    return " ".join(
        f"{k}={r[k]:.2f}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r
    )


if __name__ == "__main__":
    main()
