"""kill -9 of the router, then a restart on the same port: meanwhile the gateway answers 503
with Retry-After at once (no hang), a stream in flight ends, and afterwards the gateway serves
again by itself (its gRPC channel reconnects; nothing is restarted but the router)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from abuse_cluster import MODEL

from rpc.procs import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

DOWN_S = 12.0
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_router_restart(cluster):
    port = free_port("127.0.0.1")
    router, router_proc = cluster.router(port)
    url, gateway_proc = cluster.gateway(router)
    client = httpx.Client(base_url=url, timeout=30)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200

    # A long stream in flight when the router dies.
    got_first, stream_end = threading.Event(), {}

    def stream():
        body = {**CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                got_first.set()
                stream_end["last"] = line or stream_end.get("last")
        stream_end["at"] = time.monotonic()

    reader = threading.Thread(target=stream)
    reader.start()
    assert got_first.wait(30)
    router_proc.kill()
    router_proc.wait(10)
    killed_at = time.monotonic()
    reader.join(15)
    assert not reader.is_alive(), "the stream hung after the router died"
    assert stream_end["at"] - killed_at < 5
    assert stream_end["last"] == "data: [DONE]"  # preceded by an error event, not cut

    # Down for a while (long enough for gRPC's default reconnect backoff to grow past 5 s):
    # every call is a fast 503 with Retry-After and an OpenAI error object.
    down = []
    calls = [("/v1/chat/completions", "POST", CHAT), ("/v1/models", "GET", None),
             ("/v1/completions", "POST", {"prompt": "x", "max_tokens": 1})]  # fmt: skip
    while time.monotonic() - killed_at < DOWN_S:
        path, method, body = calls[len(down) % len(calls)]
        time.sleep(0.05)
        t0 = time.monotonic()
        r = client.request(method, path, json=body)
        down.append(time.monotonic() - t0)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "unavailable"
    assert max(down) < 1.5, max(down)

    # Back on the same port: the gateway recovers on its own.
    router, router_proc = cluster.router(port)
    healthy_at = time.monotonic()
    while (status := client.post("/v1/chat/completions", json=CHAT).status_code) != 200:
        assert status == 503 and time.monotonic() - healthy_at < 10, status
        time.sleep(0.1)
    recovered_s = time.monotonic() - healthy_at
    assert recovered_s < 3  # the channel's reconnect backoff is capped at 1 s
    assert gateway_proc.poll() is None
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    metrics = client.get("/metrics").text
    print(
        f"\nrouter restart: {len(down)} requests in {DOWN_S:.0f}s down, all 503 in "
        f"{min(down) * 1000:.0f}..{max(down) * 1000:.0f} ms; served again {recovered_s:.2f}s after the new router was healthy"
    )
    assert 'tandem:gateway_refused_requests_total{reason="router_unavailable"}' in metrics
    client.close()
