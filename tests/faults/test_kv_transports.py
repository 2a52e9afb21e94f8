"""The KV handoff's transport in a real stack on 127.0.0.1 (router, gateway, one prefill and
one decode server; SmolLM2 on CPU): with the default `--kv-transport auto` the two CPU servers
of this host hand KV over through the decode server's /dev/shm pool file, as both servers'
Stats and the decode server's Prometheus counter say; the greedy output equals the same
request over grpc (the prefill server restarted with `--kv-transport grpc`); a Router.Abort
while the shm handoff is under way (every slab written, the done message held back by
tests/faults/stalling_prefill.py) leaves every block free on both servers."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from fault_stack import MODEL_NAME, NUM_BLOCKS, FaultStack, free_port

from router.client import AsyncTandemClient
from tandem.loader.default_model import resolve_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

STALL_REQUEST_ID = "kv-abort"  # choice 0, first attempt: the push holds back its last message
# 13 blocks of 16 tokens or so: a multi-slab, multi-block handoff
PROMPT = "\n".join(
    f"Line {i}: the river gauge {i * 7 % 13} read {i * 31 % 97} cm." for i in range(14)
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    metrics_port = free_port()
    s = FaultStack(
        resolve_model_dir(None),
        tmp_path_factory.mktemp("kv_transport_logs"),
        num_prefill=1,
        num_decode=1,
        stall_kv_req_id=f"{STALL_REQUEST_ID}-0",
        # no decode-side prefix cache: every run hands over the whole prompt
        worker_flags={
            "decode": ("--no-enable-prefix-caching", "--metrics-port", str(metrics_port))
        },
    )
    s.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield s
    s.stop()


def _complete(stack: FaultStack) -> tuple[str, str]:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    r = httpx.post(f"{stack.base_url}/completions", json=body, timeout=180)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def _handoffs(stack: FaultStack, address: str) -> dict[str, int]:
    return dict(stack.stats(address).num_kv_handoffs)


def _metric(stack: FaultStack, transport: str, timeout: float = 10.0) -> float:
    """tandem:kv_handoffs_total of the decode server for that transport (sampled every 0.5 s:
    polled until it shows up)."""
    pattern = re.compile(
        rf'^tandem:kv_handoffs_total\{{[^}}]*transport="{transport}"[^}}]*\}} (\S+)$', re.M
    )
    deadline = time.monotonic() + timeout
    while True:
        m = pattern.search(httpx.get(stack.metrics_url, timeout=5).text)
        if m or time.monotonic() > deadline:
            return float(m.group(1)) if m else 0.0
        time.sleep(0.25)


def _assert_idle(stack: FaultStack) -> None:
    for address, s in stack.wait_idle().items():
        assert (s.num_running, s.num_waiting, s.num_active_handoffs) == (0, 0, 0), (address, s)
        assert s.num_free_blocks == s.num_total_blocks == NUM_BLOCKS, (address, s)


def test_shm_handoff_then_abort_mid_handoff_then_same_output_over_grpc(stack):
    prefill, decode = stack.prefill[0], stack.decode[0]

    # 1. auto on both CPU servers of this host: shm
    shm_out = _complete(stack)
    assert _handoffs(stack, decode) == {"shm": 1}
    assert _handoffs(stack, prefill) == {"shm": 1}
    assert _metric(stack, "shm") == 1.0
    _assert_idle(stack)

    # 2. Router.Abort while the shm handoff is under way
    async def abort_mid_handoff() -> None:
        async with AsyncTandemClient(stack.router, timeout=60) as client:

            async def consume() -> list[str | None]:
                return [
                    ch.finish_reason
                    async for ch in client.generate(
                        PROMPT, request_id=STALL_REQUEST_ID, max_tokens=8, temperature=0
                    )
                ]

            stream = asyncio.create_task(consume())
            deadline = time.monotonic() + 60
            # under way: every slab written into the decode pool, the push holding back its
            # done message, both ends holding the handoff
            while not (
                "fault=kv_stall" in stack.log(prefill)
                and stack.stats(decode).num_active_handoffs == 1
                and stack.stats(prefill).num_active_handoffs == 1
            ):
                assert time.monotonic() < deadline, "the handoff never got under way"
                await asyncio.sleep(0.05)
            assert await client.abort(STALL_REQUEST_ID)
            # token 0 came from the prefill server already; then the abort ends the stream
            assert (await stream)[-1] == "abort"

    asyncio.run(abort_mid_handoff())
    _assert_idle(stack)
    assert _handoffs(stack, decode) == {"shm": 1}  # the aborted one never completed

    # 3. the prefill server forced to grpc: same request, same greedy output
    stack.kill(prefill)
    stack.cmds[prefill] = [*stack.cmds[prefill], "--kv-transport", "grpc"]
    stack.restart(prefill)  # routes warm-up requests to it (over grpc) before returning
    before = _handoffs(stack, decode)
    grpc_out = _complete(stack)
    after = _handoffs(stack, decode)
    assert after == {**before, "grpc": before.get("grpc", 0) + 1}
    assert after["shm"] == 1
    assert grpc_out == shm_out
    _assert_idle(stack)
