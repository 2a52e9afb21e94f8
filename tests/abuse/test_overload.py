"""Overload at twice capacity, at the gateway and at the router, over real SmolLM2 servers:
every request is served or refused with 429/503 + Retry-After and an OpenAI error object,
none hangs, the gateway's memory stays bounded, and a normal request works afterwards."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import pytest
from abuse_cluster import rss_kib

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

RUNNING, QUEUED = 4, 4
CAPACITY = RUNNING + QUEUED
OFFERED = 2 * CAPACITY
ROUNDS = 3
PAD = "x" * (256 << 10)  # an ignored field: every request carries a 256 KiB body


def body(i: int, stream: bool) -> dict:
    return {"model": "smol", "prompt": f"Request {i}: tell me a story.", "max_tokens": 16,
            "ignore_eos": True, "temperature": 0, "stream": stream, "pad": PAD}  # fmt: skip


async def one(client: httpx.AsyncClient, i: int) -> tuple[int, httpx.Response]:
    r = await client.post("/v1/completions", json=body(i, stream=i % 2 == 0))
    return r.status_code, r


async def burst(url: str, n: int) -> list[tuple[int, httpx.Response]]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        # none hangs: the whole burst is bounded
        return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), 120)


def check_refusal(r: httpx.Response, status: int) -> None:
    assert r.status_code == status
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "overloaded"


def refused_by_reason(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("tandem:gateway_refused_requests_total{"):
            out[line.split('reason="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_gateway_overload_at_twice_capacity(cluster):
    url, proc = cluster.gateway(
        cluster.main_router, "--max-concurrent-requests", str(RUNNING),
        "--max-queued-requests", str(QUEUED), "--queue-timeout-s", "60",
    )  # fmt: skip
    asyncio.run(burst(url, 1))  # warm up: the first request allocates what every one needs
    rss = [rss_kib(proc.pid)]
    totals: collections.Counter = collections.Counter()
    t0 = time.monotonic()
    for _ in range(ROUNDS):
        results = asyncio.run(burst(url, OFFERED))
        statuses = collections.Counter(s for s, _ in results)
        totals.update(statuses)
        assert set(statuses) <= {200, 429}, statuses
        # 4 run, 4 wait and are served, the other half is refused at once
        assert statuses[200] == CAPACITY and statuses[429] == OFFERED - CAPACITY, statuses
        for status, r in results:
            if status == 429:
                check_refusal(r, 429)
                assert r.elapsed.total_seconds() < 2  # refused at once, not after waiting
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
            else:
                assert r.json()["usage"]["completion_tokens"] == 16
        rss.append(rss_kib(proc.pid))
    elapsed = time.monotonic() - t0
    refused = refused_by_reason(url)
    peak = int(
        next(x for x in open(f"/proc/{proc.pid}/status") if x.startswith("VmHWM")).split()[1]
    )
    print(
        f"\noverload: {ROUNDS} rounds x {OFFERED} requests (capacity {CAPACITY}, 256 KiB bodies) "
        f"in {elapsed:.1f}s: {dict(totals)}; refused by reason {refused}; gateway RSS KiB per "
        f"round {rss}, peak {peak}"
    )
    assert refused.get("queue_full", 0) == ROUNDS * (OFFERED - CAPACITY)
    # Bounded memory: after the first round, more rounds do not grow the gateway.
    assert rss[-1] - rss[1] < 16 << 10, rss
    # and it serves normally afterwards
    code, r = asyncio.run(burst(url, 1))[0]
    assert code == 200


def test_router_overload_maps_to_429(cluster):
    router, _ = cluster.router(0, "--max-num-requests", "2")
    url, _ = cluster.gateway(router)  # the gateway's own bound is far above the router's
    results = asyncio.run(burst(url, 8))
    statuses = collections.Counter(s for s, _ in results)
    assert set(statuses) <= {200, 429} and statuses[429] >= 1 and statuses[200] >= 2, statuses
    for status, r in results:
        if status == 429:
            check_refusal(r, 429)
    print(f"\nrouter overload: 8 requests over --max-num-requests 2: {dict(statuses)}")
    assert refused_by_reason(url)["router_overloaded"] == statuses[429]
    assert asyncio.run(burst(url, 1))[0][0] == 200
