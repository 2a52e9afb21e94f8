"""CPU: streamed tokens/s of the whole stack (gateway -> router -> prefill -> decode, real
processes, openai client, 16 concurrent streams) next to LLM.generate on the same prompts.

    python -m bench.cpu_stack --out bench/results/raw/cpu-stack-2026-11-22.json

(written into a raw/ folder, the summary goes one folder up: bench.summarize)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.summarize import write_beside

NUM_REQUESTS, MAX_TOKENS = 16, 64


def prompts() -> list[str]:
    topics = ["the sea", "a robot", "mountains", "coffee", "a library", "winter", "trains", "music"]
    return [f"Write a short story about {topics[i % 8]} (story {i})." for i in range(NUM_REQUESTS)]


async def run_stack(port: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600
    )
    ttfts: list[float] = []

    async def one(prompt: str) -> int:
        start = time.perf_counter()
        n = 0
        stream = await client.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not n:
                ttfts.append(time.perf_counter() - start)
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return n

    await one("warm up")
    ttfts.clear()
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts()))
    wall = time.perf_counter() - start
    return {
        "output_tokens": sum(counts),
        "seconds": wall,
        "tok_per_s": sum(counts) / wall,
        "ttft_p50_s": sorted(ttfts)[len(ttfts) // 2],
    }


def run_offline() -> dict:
    from tandem import LLM, SamplingParams

    llm = LLM()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(["warm up"], params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts(), params, use_tqdm=False)
    wall = time.perf_counter() - start
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": n, "seconds": wall, "tok_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem_cli.main", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        while "serving" not in (line := proc.stdout.readline()):
            if proc.poll() is not None:
                raise SystemExit("tandem serve failed")
        print(line.strip(), flush=True)
        stack = asyncio.run(run_stack(port))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    print("stack", stack, flush=True)
    offline = run_offline()
    print("offline", offline, flush=True)
    import torch

    result = {
        "date": "2026-11-22",
        "machine": f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (fp32)",
        "requests": NUM_REQUESTS,
        "max_tokens": MAX_TOKENS,
        "stack_1p1d": stack,
        "offline_llm_generate": offline,
        "ratio_stack_to_offline": stack["tok_per_s"] / offline["tok_per_s"],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    write_beside(Path(args.out))
    print(json.dumps({"ratio_stack_to_offline": result["ratio_stack_to_offline"]}))


if __name__ == "__main__":
    main()
