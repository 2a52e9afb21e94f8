"""How long `tandem bench`'s HTTP client takes to finish N streams that end at the same moment,
with one httpx client for all of them and with bench.runner.ClientPool (clients of
POOL_SHARD connections). A raw asyncio server in a subprocess streams EVENTS SSE chunks on each
connection, starting once all N are connected, so every stream ends together.

    python -m bench.client_pool --streams 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

SERVER = r"""
import asyncio, sys, time
n, events, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
state = {"connected": 0, "end": None}
async def handle(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    state["connected"] += 1
    while state["connected"] < n:
        await asyncio.sleep(0.01)
    for _ in range(events):
        data = b'data: {"choices":[{"text":"x"}]}\n\n'
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await writer.drain()
        await asyncio.sleep(0.01)
    data = b"data: [DONE]\n\n"
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
    await writer.drain()
    if state["end"] is None:
        state["end"] = time.time()
        print(state["end"], flush=True)
    await asyncio.sleep(60)
async def main():
    await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


async def run(n: int, port: int, pooled: bool) -> float:
    from bench.runner import ClientPool, LoadConfig, http_client

    load = LoadConfig()
    pool = ClientPool(load, n) if pooled else None
    single = None if pooled else http_client(load, n)
    done: list[float] = []

    async def one(i: int) -> None:
        client = pool[i] if pooled else single
        async with client.stream("POST", f"http://127.0.0.1:{port}/", json={}) as r:
            async for _ in r.aiter_raw():
                pass
        done.append(time.time())

    await asyncio.gather(*(one(i) for i in range(n)))
    for c in pool.clients if pooled else [single]:
        await c.aclose()
    return max(done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=512)
    ap.add_argument("--events", type=int, default=20)
    a = ap.parse_args()
    out = {}
    for pooled in (False, True):
        port = 18000 + int(pooled)
        srv = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(a.streams), str(a.events), str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert srv.stdout.readline().strip() == "ready"
            last = asyncio.run(run(a.streams, port, pooled))
            end = float(srv.stdout.readline())
        finally:
            srv.kill()
        key = "client_pool" if pooled else "one_client"
        out[key] = {"last_stream_done_after_server_end_s": round(last - end, 3)}
    print(json.dumps({"streams": a.streams, **out}))


if __name__ == "__main__":
    main()
