"""Self-registering pools in real processes: a decode server joins a live stack, drains under
load without failing a request, and is dropped when killed.

One stack per module (pool_helpers.PoolStack): router with one static decode server and a prefill
server that registered itself. Two more decode servers join it with --router (loading in
parallel to save time); the drain test stops one, the kill test the other.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest
from pool_helpers import HEARTBEAT_MS, scrape, wait_until

from protos import worker_pb2, worker_pb2_grpc
from router.client import TandemClient, TandemError
from router.workers import MISSED_HEARTBEATS
from worker.drain import QUIET_S

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DRAIN_TIMEOUT_S = 20
PROMPTS = [
    "Tell me a story about a cat.",
    "What is the capital of France?",
    "List three colors.",
    "Why is the sky blue?",
]


def _stats(role: str, address: str) -> worker_pb2.WorkerStats:
    stub = worker_pb2_grpc.DecodeStub if role == "decode" else worker_pb2_grpc.PrefillStub
    with grpc.insecure_channel(address) as ch:
        return stub(ch).Stats(worker_pb2.StatsRequest(), timeout=2)


class ClientLoop:
    """`num_clients` threads, each streaming one request after another through the router."""

    def __init__(self, router: str, num_clients: int, max_tokens: int, filler: int = 0) -> None:
        self.router = router
        self.max_tokens = max_tokens
        self.filler = " ".join(["tokens"] * filler)  # longer prompts: longer prefills
        self.finished: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(num_clients)
        ]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self, i: int) -> None:
        with TandemClient(self.router, timeout=60) as client:
            k = 0
            while not self._stop.is_set():
                # the id first, so no two prompts share a cached prefix
                prompt = f"({i}.{k}) {self.filler} {PROMPTS[(i + k) % len(PROMPTS)]}"
                k += 1
                try:
                    reason = None
                    for chunk in client.generate(prompt, max_tokens=self.max_tokens):
                        reason = chunk.finish_reason or reason
                except TandemError as e:
                    self.failures.append(f"{prompt}: {e}")
                    continue
                if reason in ("stop", "length"):
                    self.finished.append(reason)
                else:
                    self.failures.append(f"{prompt}: finish_reason={reason}")


@pytest.fixture(scope="module")
def joined(pool_stack):
    """Two decode servers started against the live stack with --router."""
    pool_stack.wait_members("decode", 1)
    with TandemClient(pool_stack.router, timeout=60) as client:  # the stack serves already
        assert client.complete(PROMPTS[0], max_tokens=2).finish_reasons[0] in ("stop", "length")
    extra = ["--drain-timeout", str(DRAIN_TIMEOUT_S)]
    ws = [pool_stack.start_worker("decode", wait=False, extra=extra) for _ in range(2)]
    for w in ws:
        pool_stack.wait_healthy(w)
    pool_stack.wait_members("decode", 3)
    return ws


def test_started_decode_servers_register_and_receive_work(pool_stack, joined):
    with TandemClient(pool_stack.router, timeout=60) as client:
        for k in range(6):  # sequential: the router rotates among equally idle servers
            out = client.complete(PROMPTS[k % len(PROMPTS)], max_tokens=4)
            assert out.finish_reasons[0] in ("stop", "length")
    for w in (*joined, pool_stack.static_decode):
        assert pool_stack.routed("decode", w.address) >= 1
    for w in joined:
        assert "event=worker_registered" in w.log_text()
    # the registered prefill server did the prefills
    assert pool_stack.routed("prefill", pool_stack.prefill.address) >= 6
    # the worker's own metrics (what an HPA scales on)
    names = {name for name, _ in scrape(joined[0].metrics_port)}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "tandem:num_active_handoffs",
    ):
        assert name in names


def test_sigterm_drains_under_load_without_failing_requests(pool_stack, joined):
    w = joined[0]
    routed_before = pool_stack.routed("decode", w.address)
    with ClientLoop(pool_stack.router, num_clients=3, max_tokens=24) as load:
        # SIGTERM while the server has requests of its own in flight
        wait_until(
            lambda: _stats("decode", w.address).num_running > 0, 60, "a request on the server"
        )
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        rc = w.proc.wait(timeout=DRAIN_TIMEOUT_S + 10)
        drain_s = time.monotonic() - t0
        # keep the load going a little on the remaining decode server
        num_before_exit = len(load.finished)
        wait_until(lambda: len(load.finished) >= num_before_exit + 3, 60, "requests after drain")
    assert rc == 0
    assert drain_s < DRAIN_TIMEOUT_S  # finished its work; not cut off by the bound
    assert load.failures == []
    assert len(load.finished) >= 6
    assert pool_stack.routed("decode", w.address) > routed_before

    log = w.log_text()
    start = re.search(r"event=drain_start .*engine_requests=(\d+)", log)
    done = re.search(r"event=drain_done .*remaining=(\d+) deregistered=(\w+)", log)
    assert start and int(start.group(1)) > 0, log  # the drain had work to finish
    assert done and done.group(1) == "0" and done.group(2) == "True", log
    assert drain_s >= QUIET_S
    # the router dropped it once drained; the others serve on
    pool_stack.wait_members("decode", 2, timeout=5)
    assert pool_stack.members("decode", "draining") == 0


def test_sigterm_drains_the_prefill_server_without_failing_requests(pool_stack, joined):
    """The only prefill server drains: what it took finishes (prefill and KV push), later
    requests are prefilled by the decode servers themselves."""
    w = pool_stack.prefill
    routed_before = pool_stack.routed("prefill", w.address)
    with ClientLoop(pool_stack.router, num_clients=3, max_tokens=4, filler=150) as load:

        def prefilling():
            s = _stats("prefill", w.address)
            return s.num_running + s.num_waiting > 0

        wait_until(prefilling, 60, "a prefill on the server", interval=0.01)
        w.proc.send_signal(signal.SIGTERM)
        rc = w.proc.wait(timeout=DRAIN_TIMEOUT_S + 10)
        num_before_exit = len(load.finished)
        wait_until(lambda: len(load.finished) >= num_before_exit + 3, 60, "requests after drain")
    assert rc == 0
    assert load.failures == []
    assert pool_stack.routed("prefill", w.address) > routed_before
    log = w.log_text()
    start = re.search(r"event=drain_start .*rpcs=(\d+) engine_requests=(\d+) handoffs=(\d+)", log)
    assert start and sum(map(int, start.groups())) > 0, log
    assert re.search(r"event=drain_done .*remaining=0 deregistered=True", log), log
    pool_stack.wait_members("prefill", 0, timeout=5)


def test_killed_server_leaves_pool_within_heartbeat_window(pool_stack, joined):
    w = joined[1]
    n = sum(pool_stack.members("decode", s) for s in ("serving", "unhealthy"))
    w.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    w.proc.wait(timeout=10)

    def gone():
        return sum(pool_stack.members("decode", s) for s in ("serving", "unhealthy")) == n - 1

    wait_until(gone, 10, "the killed server's removal", interval=0.02)
    window_s = MISSED_HEARTBEATS * HEARTBEAT_MS / 1000
    assert time.monotonic() - t0 <= window_s + 1.0  # + one expiry tick and scrape slack
    assert "reason=heartbeat_timeout" in pool_stack.router_log()

    routed = pool_stack.routed("decode", w.address)
    with TandemClient(pool_stack.router, timeout=60) as client:
        for prompt in PROMPTS[:3]:
            assert client.complete(prompt, max_tokens=4).finish_reasons[0] in ("stop", "length")
    assert pool_stack.routed("decode", w.address) == routed
