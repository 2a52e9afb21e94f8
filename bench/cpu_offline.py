"""CPU offline throughput: tandem `LLM.generate` vs HF transformers `generate`, one run.

SmolLM2-135M-Instruct (the default model, fp32), 16 prompts, 128 output tokens each (EOS
ignored on both sides), greedy. Both sides warm up first. Writes
bench/results/raw/cpu-offline-<date>.json and its summary bench/results/cpu-offline-<date>.json.

    python -m bench.cpu_offline [--date 2026-11-22] [--batch 16] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.summarize import write_beside

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def quicksort(arr):",
    "Explain what a hash table is.",
    "List five animals that live in the desert:",
    "Once upon a time, in a kingdom far away,",
    "The three laws of thermodynamics are",
    "Translate to French: Good morning, how are you?",
    "What is the difference between TCP and UDP?",
    "A recipe for pancakes:",
    "import numpy as np\n",
    "The best way to learn a new language is",
    "Summarize the plot of Romeo and Juliet.",
    "Q: What is 12 times 12?\nA:",
    "The history of the internet began",
    "Give three tips for a job interview:",
]


def bench_tandem(llm, prompt_ids, max_tokens):
    from tandem import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt_ids[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompt_ids, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens, seconds


@torch.inference_mode()
def bench_hf(model, tokenizer, prompt_ids, max_tokens):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    kw = dict(do_sample=False, pad_token_id=pad)
    model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=8, **kw)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        **kw,
    )
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * out.shape[0]
    return tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--date", default="2026-11-22")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    from tandem import LLM

    llm = LLM(dtype="float32", device="cpu")
    tok = llm.tokenizer
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    t_tokens, t_sec = bench_tandem(llm, prompt_ids, args.max_tokens)
    del llm

    hf = AutoModelForCausalLM.from_pretrained(_model_dir(), dtype=torch.float32).eval()
    h_tokens, h_sec = bench_hf(hf, tok, prompt_ids, args.max_tokens)

    result = {
        "date": args.date,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "num_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        # other processes on the machine skew CPU numbers: the 1-minute load at the end
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "prompt_tokens": [len(p) for p in prompt_ids],
        "tandem": {
            "output_tokens": t_tokens,
            "seconds": round(t_sec, 3),
            "tokens_per_s": round(t_tokens / t_sec, 2),
        },
        "hf_transformers": {
            "output_tokens": h_tokens,
            "seconds": round(h_sec, 3),
            "tokens_per_s": round(h_tokens / h_sec, 2),
        },
    }
    result["ratio_tandem_over_hf"] = round(
        result["tandem"]["tokens_per_s"] / result["hf_transformers"]["tokens_per_s"], 3
    )
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "raw" / f"cpu-offline-{args.date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} and its summary {write_beside(out)}")


def _model_dir() -> str:
    from tandem.loader.default_model import default_gguf_path, ensure_converted

    return str(ensure_converted(default_gguf_path()))


if __name__ == "__main__":
    main()
