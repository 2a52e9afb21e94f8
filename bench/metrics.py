"""Per-request records -> the summary of a run (definitions of `vllm bench serve`).

TTFT   first chunk with content - send
E2EL   last chunk with content - send
ITL    gap between successive content chunks, pooled over requests. A chunk may carry more
       than one token (the router holds back an incomplete UTF-8 character, a worker may send
       several tokens at once): like vLLM's bench, the gap is recorded once per chunk, not
       divided among its tokens, so ITL is per chunk and TPOT is per token.
TPOT   (E2EL - TTFT) / (output tokens - 1) per request, output tokens from the usage chunk;
       requests with one output token have no TPOT (and count as TPOT 0 for goodput)
goodput  requests per second meeting every given SLO (ttft, tpot, e2el in ms); the fraction
       of requests meeting them is the SLO attainment
throughput  tokens / (first send -> last finish) of the measured requests
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")
_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass(slots=True)
class RequestRecord:
    """One request's measurement; times in seconds, send_time relative to the run's start."""

    index: int
    prompt_len: int  # tokens in the dataset prompt
    expected_output_len: int  # max_tokens sent
    send_time: float = 0.0
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0  # E2EL
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    num_chunks: int = 0  # content chunks received
    prompt_tokens: int = 0  # from usage (0: the server sent none)
    output_tokens: int = 0  # from usage
    cached_tokens: int = 0  # from usage.prompt_tokens_details
    finish_reason: str | None = None

    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(specs: Sequence[str] | None) -> dict[str, float]:
    """["ttft:400", "tpot:40"] -> {"ttft": 400.0, "tpot": 40.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for spec in specs or ():
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"goodput SLO {spec!r}: expected NAME:MS with NAME in {SLO_METRICS}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {spec!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise ValueError(f"goodput SLO {spec!r}: the limit must be > 0 ms")
        slos[name] = ms
    return slos


def parse_percentiles(text: str) -> list[float]:
    ps = [float(p) for p in text.split(",") if p.strip()]
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"percentiles {text!r}: comma-separated values in (0, 100]")
    return ps


def _pname(p: float) -> str:
    return f"p{p:g}"


def is_good(r: RequestRecord, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot() or 0.0, "e2el": r.latency}
    return all(values[k] * 1000 <= limit for k, limit in slos.items())


def summarize(
    records: Sequence[RequestRecord],
    percentiles: Sequence[float] = (50, 90, 99),
    slos: dict[str, float] | None = None,
    max_concurrency_reached: int = 0,
) -> dict:
    ok = [r for r in records if r.success]
    out: dict = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "max_concurrency_reached": max_concurrency_reached,
    }
    if ok:
        start = min(r.send_time for r in ok)
        duration = max(r.send_time + r.latency for r in ok) - start
    else:
        duration = 0.0
    input_tokens = sum(r.prompt_tokens or r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    out.update(
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        cached_tokens=sum(r.cached_tokens for r in ok),
        # prompt tokens the server reports as served from its prefix cache (usage details)
        prefix_cache_hit_rate=sum(r.cached_tokens for r in ok) / max(1, input_tokens),
        request_throughput=rate(len(ok)),
        output_throughput=rate(output_tokens),
        total_token_throughput=rate(input_tokens + output_tokens),
        # output length differing from max_tokens: EOS not ignored, a stop, or a server bug
        output_len_mismatches=sum(r.output_tokens != r.expected_output_len for r in ok),
        mean_tokens_per_chunk=output_tokens / max(1, sum(r.num_chunks for r in ok)),
    )
    if slos:
        good = sum(is_good(r, slos) for r in ok)
        out["goodput_slos_ms"] = dict(slos)
        out["good_requests"] = good
        # DistServe-style check: SLO attainment >= 0.9 means the p90 of each metric is in SLO
        out["slo_attainment"] = good / len(ok) if ok else 0.0
        out["request_goodput"] = rate(good)
    values = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot()) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name in METRICS:
        xs = np.asarray(values[name], dtype=np.float64) * 1000
        out[f"mean_{name}_ms"] = float(xs.mean()) if xs.size else 0.0
        out[f"median_{name}_ms"] = float(np.median(xs)) if xs.size else 0.0
        out[f"std_{name}_ms"] = float(xs.std()) if xs.size else 0.0
        for p in percentiles:
            out[f"{_pname(p)}_{name}_ms"] = float(np.percentile(xs, p)) if xs.size else 0.0
    return out


def format_summary(
    summary: dict, percentiles: Sequence[float], metrics: Sequence[str] = METRICS
) -> str:
    """The printed table."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value, fmt: str = "<10.2f") -> None:
        lines.append(f"{label:<40} {value:{fmt}}")

    row("Successful requests:", summary["completed"], "<10")
    row("Failed requests:", summary["failed"], "<10")
    row("Maximum concurrent requests reached:", summary["max_concurrency_reached"], "<10")
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"], "<10")
    row("Total generated tokens:", summary["total_output_tokens"], "<10")
    row("Request throughput (req/s):", summary["request_throughput"])
    if "request_goodput" in summary:
        row("Request goodput (req/s):", summary["request_goodput"])
        row("SLO attainment (fraction of requests):", summary["slo_attainment"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    row("Mean tokens per chunk:", summary["mean_tokens_per_chunk"])
    if summary["cached_tokens"]:
        row("Prefix cache hit rate (prompt tokens):", summary["prefix_cache_hit_rate"])
    if summary.get("client_cpu_s") and summary["duration_s"]:
        # near 1: this client, not the server, may be what limits the run
        row("Client CPU (share of one core):", summary["client_cpu_s"] / summary["duration_s"])
    if summary["output_len_mismatches"]:
        row("Outputs shorter/longer than max_tokens:", summary["output_len_mismatches"], "<10")
    for name in metrics:
        lines.append("{s:{c}^{n}}".format(s=_TITLES[name], n=w, c="-"))
        key = name.upper()
        row(f"Mean {key} (ms):", summary[f"mean_{name}_ms"])
        row(f"Median {key} (ms):", summary[f"median_{name}_ms"])
        for p in percentiles:
            if p != 50:  # the median, printed above
                row(f"P{p:g} {key} (ms):", summary[f"{_pname(p)}_{name}_ms"])
    lines.append("=" * w)
    return "\n".join(lines)


def merge_results(
    results: Sequence[dict],
    percentiles: Sequence[float] = (50, 90, 99),
    slos: dict[str, float] | None = None,
) -> dict:
    """Result files of several `tandem bench` processes that ran together (--start-at) as one
    run: every record's send time on the earliest client's clock, one summary over all of
    them (max concurrency and client CPU summed), each record tagged with its client."""
    t0 = min(r["t0_unix"] for r in results)
    records, rows = [], []
    for client, r in enumerate(results):
        shift = r["t0_unix"] - t0
        for d in r["requests"]:
            row = {**d, "send_time": d["send_time"] + shift, "client": client}
            rows.append(row)
            records.append(
                RequestRecord(**{k: v for k, v in row.items() if k not in ("tpot", "client")})
            )
    peak = sum(r["summary"]["max_concurrency_reached"] for r in results)
    summary = summarize(records, percentiles, slos, peak)
    summary["client_cpu_s"] = sum(r["summary"].get("client_cpu_s", 0.0) for r in results)
    summary["num_clients"] = len(results)
    return {
        "date": min(r["date"] for r in results),
        "t0_unix": t0,
        "settings": [r["settings"] for r in results],
        "summary": summary,
        "requests": rows,
    }
