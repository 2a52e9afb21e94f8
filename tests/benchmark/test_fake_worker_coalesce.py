"""The fake decode server's --coalesce mode: tokens made on the engine's clock, and a stream
that lags gets every queued token in one event (as the real decode server's `_drain`)."""

import asyncio

import pytest

from protos import common_pb2
from tandem.benchmark.fake_worker import FakeDecode, output_token

pytestmark = pytest.mark.timeout(30)

PROMPT = [5, 6, 7, 8, 9]


def sampling(**kw):
    return common_pb2.SamplingParams(max_tokens=12, **kw)


async def events(gen, lag_turns: int = 0) -> list[tuple[list[int], int]]:
    out = [await anext(gen)]
    for _ in range(lag_turns):  # the engine makes one token per loop turn (itl 0)
        await asyncio.sleep(0)
    while not out[-1][1]:  # the servicer stops at the finish reason
        out.append(await anext(gen))
    await gen.aclose()
    return out


@pytest.mark.parametrize("s", [sampling(), sampling(stop_token_ids=[8], min_tokens=5)])
def test_lagging_stream_gets_queued_tokens_in_one_event(s):
    async def go():
        worker = FakeDecode("unused", coalesce=True)
        lockstep = await events(FakeDecode("unused")._lockstep(PROMPT, s, 0))
        lagged = await events(worker._steps(PROMPT, s, 0), lag_turns=3 * 12)
        return lockstep, lagged

    lockstep, lagged = asyncio.run(go())
    tokens = [t for toks, _ in lockstep for t in toks]
    assert all(len(toks) == 1 for toks, _ in lockstep)
    assert [t for toks, _ in lagged for t in toks] == tokens
    assert tokens == [output_token(PROMPT, i) for i in range(len(tokens))]
    assert len(lagged) == 2  # the first token, then everything made while it lagged
    assert [r for _, r in lagged[:-1]] == [common_pb2.FINISH_REASON_UNSPECIFIED]
    assert lagged[-1][1] == lockstep[-1][1] != common_pb2.FINISH_REASON_UNSPECIFIED
