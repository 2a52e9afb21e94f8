"""A benchmark run: warm-up, then every request at its arrival time under a concurrency cap.

warm-up    num_warmups requests at once, not measured; a failure stops the run (a wrong model
           name or URL shows up here, not as a table of failures)
arrivals   request i becomes due at arrival[i]: all at t=0 (rate inf), or a gamma process of
           the given rate (burstiness 1: Poisson, exponential gaps), seeded
cap        at most max_concurrency requests in flight; a request's send time is taken when it
           gets a slot (as in vLLM's bench), so waiting for a slot does not count in its TTFT
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from bench.client import Endpoint, stream_request
from bench.datasets import SampleRequest
from bench.metrics import RequestRecord


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf  # requests/s; inf: all due at once
    burstiness: float = 1.0  # gamma shape of the gaps; 1: Poisson arrivals
    max_concurrency: int | None = None  # None: no cap
    seed: int = 0
    request_timeout_s: float = 6 * 3600.0
    progress: bool = True

    def __post_init__(self):
        if not self.request_rate > 0:
            raise ValueError("request rate must be > 0 (inf: all at once)")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max concurrency must be >= 1")


@dataclass
class RunResult:
    records: list[RequestRecord]
    max_concurrency_reached: int
    t0_unix: float  # wall clock at send_time 0 (to merge the runs of several client processes)
    client_cpu_s: float  # CPU this process spent during the run (near duration: client-bound)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seconds from the start at which each of n requests is due; the first at 0."""
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    # Gamma gaps with mean 1/rate; shape 1 is the exponential distribution.
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# Connections per httpx client. httpcore's pool rescans all of its connections each time a
# response closes, so one client holding 512 streams that end together spends seconds (13.6 s
# for 512 on the 2-core dev VM, 2-3 s at the end of W1 on the GPU host, where the late
# streams' tokens then all arrive at once); 32 clients of 16 finish the same 512 in 0.6 s.
POOL_SHARD = 16


class ClientPool:
    """Enough httpx clients that none holds more than about POOL_SHARD connections; request i
    goes through client i mod n."""

    def __init__(self, load: LoadConfig, max_connections: int) -> None:
        n = max(1, -(-max_connections // POOL_SHARD))
        self.clients = [http_client(load, max_connections) for _ in range(n)]

    def __getitem__(self, i: int) -> httpx.AsyncClient:
        return self.clients[i % len(self.clients)]

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc) -> None:
        for c in self.clients:
            await c.aclose()


def http_client(load: LoadConfig, max_connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(load.request_timeout_s, connect=30.0),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        trust_env=False,  # a benchmark talks to the server directly, never through a proxy
    )


async def fetch_model(base_url: str, api_key: str = "", timeout: float = 30.0) -> dict:
    """The first entry of GET /v1/models (id, root, max_model_len)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        resp = await client.get(base_url + "/v1/models", headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {resp.status_code}: {resp.text[:300]}")
        data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models lists no model")
    return data[0]


async def warm_up(endpoint: Endpoint, requests: Sequence[SampleRequest], load: LoadConfig) -> None:
    if not requests:
        return
    async with ClientPool(load, len(requests)) as clients:
        t0 = time.perf_counter()
        records = await asyncio.gather(
            *(
                stream_request(clients[i], endpoint, r, RequestRecord(-1 - i, r.prompt_len, r.output_len), t0)
                for i, r in enumerate(requests)
            )
        )  # fmt: skip
    failed = [r for r in records if not r.success]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0].error}")


async def run_requests(
    endpoint: Endpoint,
    requests: Sequence[SampleRequest],
    load: LoadConfig,
    start_at: float | None = None,
) -> RunResult:
    """Send every request at its arrival time; start_at: wall-clock time to begin at."""
    arrivals = arrival_times(len(requests), load.request_rate, load.burstiness, load.seed)
    records = [RequestRecord(i, r.prompt_len, r.output_len) for i, r in enumerate(requests)]
    cap = load.max_concurrency or len(requests)
    slots = asyncio.Semaphore(cap)
    in_flight = peak = 0
    bar = None
    if load.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), unit="req", dynamic_ncols=True)

    async def one(i: int) -> None:
        nonlocal in_flight, peak
        async with slots:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await stream_request(clients[i], endpoint, requests[i], records[i], t0)
            finally:
                in_flight -= 1
                if bar is not None:
                    bar.update(1)

    async with ClientPool(load, max(1, min(cap, len(requests)))) as clients:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        # The run allocates millions of small objects (one JSON dict per chunk); keep the
        # collector from re-walking everything built before it (dataset, tokenizer vocab).
        gc.collect()
        gc.freeze()
        t0, t0_unix, cpu0 = time.perf_counter(), time.time(), time.process_time()
        tasks = []
        for i, due in enumerate(arrivals):
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            if bar is not None:
                bar.close()
            gc.unfreeze()
    return RunResult(records, peak, t0_unix, time.process_time() - cpu0)
