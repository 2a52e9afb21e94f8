"""`tandem bench`: flags -> dataset -> warm-up -> run -> summary table (+ JSON result file)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

from bench.client import Endpoint
from bench.datasets import (
    SampleRequest,
    WordVocab,
    load_tokenizer,
    prefix_requests,
    random_requests,
)
from bench.metrics import (
    METRICS,
    format_summary,
    parse_goodput,
    parse_percentiles,
    summarize,
)
from bench.runner import LoadConfig, fetch_model, run_requests, warm_up


def add_cli_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="gateway URL (/v1 optional)")
    g.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY") or os.environ.get("OPENAI_API_KEY", ""),
        help="sent as `Authorization: Bearer KEY` (env TANDEM_API_KEY or OPENAI_API_KEY)",
    )
    g.add_argument(
        "--endpoint-type", choices=["completions", "chat"], default="completions",
        help="/v1/completions or /v1/chat/completions",
    )  # fmt: skip
    g.add_argument(
        "--prompt-format", choices=["ids", "text"], default="ids",
        help="completions prompt as a token-id list (exact length) or as text (chat: always text)",
    )  # fmt: skip
    g.add_argument(
        "--tokenizer", default=None,
        help="HF model dir or tokenizer.json (default: the default model's, when the server serves"
        " it; servers do not reveal their model paths)",
    )  # fmt: skip
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false",
        help="let EOS end outputs early (default: ignore_eos=true, exact output lengths)",
    )  # fmt: skip
    g.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="seconds")
    g.add_argument(
        "--extra-body", type=json.loads, default={},
        help="JSON object merged into every request body, e.g. a response_format",
    )  # fmt: skip

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=["random", "prefix"], default="random")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument(
        "--random-range-ratio", type=float, default=0.0,
        help="lengths uniform in len * [1 - r, 1 + r]; 0: exact",
    )  # fmt: skip
    g.add_argument("--prefix-len", type=int, default=2048, help="shared prefix tokens")
    g.add_argument("--num-prefixes", type=int, default=64)
    g.add_argument("--suffix-len", type=int, default=128, help="distinct suffix tokens")
    g.add_argument("--prefix-output-len", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("load")
    g.add_argument(
        "--request-rate", type=float, default=math.inf,
        help="requests/s (Poisson arrivals; see --burstiness); inf: all at once",
    )  # fmt: skip
    g.add_argument(
        "--burstiness", type=float, default=1.0,
        help="gamma shape of the arrival gaps; 1: Poisson, < 1 burstier, > 1 steadier",
    )  # fmt: skip
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument(
        "--num-warmups", type=int, default=1, help="unmeasured requests sent first (all at once)"
    )
    g.add_argument(
        "--start-at", type=float, default=None, metavar="UNIX_TIME",
        help="begin the measured run at this wall-clock time (several client processes)",
    )  # fmt: skip

    g = p.add_argument_group("results")
    g.add_argument(
        "--percentiles", "--metric-percentiles", dest="percentiles", default="50,90,99",
        help="comma-separated percentiles to report",
    )  # fmt: skip
    g.add_argument(
        "--percentile-metrics", default=",".join(METRICS),
        help=f"comma-separated subset of {','.join(METRICS)} to print",
    )  # fmt: skip
    g.add_argument(
        "--goodput", nargs="+", default=None, metavar="NAME:MS",
        help="SLOs for goodput, e.g. --goodput ttft:400 tpot:40 (ttft, tpot, e2el in ms)",
    )  # fmt: skip
    g.add_argument("--result-file", default=None, help="write settings, summary and records")
    g.add_argument(
        "--metadata", nargs="+", default=[], metavar="KEY=VALUE",
        help="recorded in the result file's settings (GPU, commit, ...)",
    )  # fmt: skip
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def _local_tokenizer(root: str, model: str) -> str:
    """The tokenizer of the served model on this machine: servers do not reveal their paths,
    so a model dir given as `root`, or the default model's (installed here) when served."""
    if root and (Path(root) / "tokenizer.json").is_file():
        return root
    from tandem.loader.default_model import DEFAULT_MODEL_NAME, resolve_model_dir

    if DEFAULT_MODEL_NAME in (root, model):
        return str(resolve_model_dir(None))
    raise ValueError(f"the served model {model!r} has no local tokenizer here: pass --tokenizer")


def _base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def build_requests(args, vocab: WordVocab) -> tuple[list[SampleRequest], list[SampleRequest]]:
    """(measured requests, warm-up requests); warm-ups are random prompts of the same size."""
    if args.dataset_name == "random":
        reqs = random_requests(
            vocab, args.num_prompts, args.random_input_len, args.random_output_len,
            args.random_range_ratio, args.seed,
        )  # fmt: skip
    else:
        reqs = prefix_requests(
            vocab, args.num_prompts, args.prefix_len, args.num_prefixes, args.suffix_len,
            args.prefix_output_len, args.seed,
        )  # fmt: skip
    first = reqs[0]
    warm = random_requests(
        vocab, args.num_warmups, first.prompt_len, first.output_len, 0.0, args.seed + 1
    )
    return reqs, warm


def _metric_names(args) -> list[str]:
    return [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]


def _settings(args, model: str, tokenizer: str) -> dict:
    s = {k: v for k, v in vars(args).items() if k != "api_key"}
    s["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    s.update(base_url=_base_url(args.base_url), model=model, tokenizer=tokenizer)
    s["metadata"] = dict(kv.split("=", 1) for kv in args.metadata)
    return s


async def benchmark(args: argparse.Namespace) -> dict:
    """Run the benchmark the flags describe; returns {settings, summary, requests}."""
    percentiles = parse_percentiles(args.percentiles)
    slos = parse_goodput(args.goodput)
    if any("=" not in kv for kv in args.metadata):
        raise ValueError("--metadata takes KEY=VALUE pairs")
    if unknown := set(_metric_names(args)) - set(METRICS):
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; known {METRICS}")
    if args.num_prompts < 1 or args.num_warmups < 0:
        raise ValueError("--num-prompts must be >= 1 and --num-warmups >= 0")
    load = LoadConfig(
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        request_timeout_s=args.request_timeout,
        progress=not args.disable_tqdm,
    )
    base_url = _base_url(args.base_url)
    model, tokenizer = args.model, args.tokenizer
    if model is None or tokenizer is None:
        card = await fetch_model(base_url, args.api_key)
        model = model or card["id"]
        root = card.get("root") or ""
        if tokenizer is None:
            tokenizer = _local_tokenizer(root, model)
    vocab = WordVocab(load_tokenizer(tokenizer))
    if args.prompt_format == "text" and vocab.num_special_added:
        print(
            f"note: the tokenizer adds {vocab.num_special_added} special token(s) to text prompts",
            file=sys.stderr,
        )
    requests, warmups = build_requests(args, vocab)
    endpoint = Endpoint(
        base_url=base_url,
        model=model,
        kind=args.endpoint_type,
        prompt_format=args.prompt_format,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=tuple(args.extra_body.items()),
    )
    await warm_up(endpoint, warmups, load)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run = await run_requests(endpoint, requests, load, args.start_at)
    summary = summarize(run.records, percentiles, slos, run.max_concurrency_reached)
    summary["client_cpu_s"] = run.client_cpu_s
    return {
        "date": started,
        "t0_unix": run.t0_unix,
        "settings": _settings(args, model, str(tokenizer)),
        "summary": summary,
        "requests": [_record_json(r) for r in run.records],
    }


def _record_json(r) -> dict:
    d = {f.name: getattr(r, f.name) for f in fields(r)}  # asdict() would deep-copy every list
    d["tpot"] = r.tpot()
    return d


def _run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="tandem bench", description=__doc__))
    args = parser.parse_args(argv)
    try:
        result = _run_loop(benchmark(args))
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        print(f"tandem bench: error: {e}", file=sys.stderr)
        return 2
    summary = result["summary"]
    print(format_summary(summary, parse_percentiles(args.percentiles), _metric_names(args)))
    failed = [r for r in result["requests"] if not r["success"]]
    if failed:
        print(f"first failure: {failed[0]['error']}", file=sys.stderr)
    if args.result_file:
        path = Path(args.result_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        print(f"results written to {path}")
    return 0 if summary["completed"] else 1
