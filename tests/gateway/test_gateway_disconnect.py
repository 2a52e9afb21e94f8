"""A client that disconnects before its first token aborts the request on the workers at once,
not when the first token finally arrives (the prefill here takes 3 s)."""

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(60)

PREFILL_S = 3.0


@pytest.fixture
def slow_prefill(stack):
    prefill = stack["stack"].prefills[0]
    prefill.servicer.prefill_delay_s = PREFILL_S
    yield prefill
    prefill.servicer.prefill_delay_s = 0.0


async def _leave_early(url: str, body: dict) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        try:
            await asyncio.wait_for(c.post(url, json=body), 0.3)
        except asyncio.TimeoutError:
            pass  # the connection is closed here, long before the first token


def _wait_until(check, timeout: float) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, "the request was not aborted in time"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_before_first_token_aborts_downstream(stack, slow_prefill, stream):
    state = slow_prefill.state
    before = len(state.requests)
    # a fresh prompt each time: a cached one might skip the prefill server
    body = {"model": "tiny", "prompt": f"Hello {stream}", "max_tokens": 4, "stream": stream}
    t0 = time.monotonic()
    asyncio.run(_leave_early(stack["url"] + "/v1/completions", body))
    _wait_until(lambda: len(state.requests) > before, 2)  # the prefill had started
    # The gateway cancels its call; the router cancels the prefill and aborts the decode side.
    _wait_until(lambda: not state.active, 2)
    assert time.monotonic() - t0 < PREFILL_S
    decode = stack["stack"].decodes[0].state
    _wait_until(lambda: not decode.active, 2)
    ok = httpx.post(
        stack["url"] + "/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 1},
        timeout=15,
    )
    assert ok.status_code == 200
