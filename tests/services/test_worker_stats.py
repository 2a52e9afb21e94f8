"""A worker's Stats while its engine thread is busy (a long step, a CUDA-graph capture): it
answers with the last figures read instead of waiting past the router's deadline, and the
first Stats of an engine, with nothing read yet, waits for real figures."""

from __future__ import annotations

import asyncio
import time

import pytest

from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.records import SamplingParams
from worker.load import worker_stats


@pytest.fixture(scope="module")
def llm_engine():
    return LLMEngine(EngineConfig(num_blocks=64, max_num_batched_tokens=64))


def _run(llm_engine, body):
    engine = AsyncEngine(llm_engine)
    try:
        return asyncio.run(body(engine))
    finally:
        engine.shutdown()


def test_a_busy_engine_answers_with_the_last_figures_read(llm_engine):
    async def body(engine):
        first = await worker_stats(engine, wait_s=5)
        # the engine thread is now stuck in one long call; a request is queued behind it
        busy = asyncio.ensure_future(engine.call(time.sleep, 2.0))
        add = asyncio.ensure_future(
            engine.call(
                llm_engine.add_request,
                "r1",
                [1, 2, 3],
                SamplingParams(max_tokens=500, ignore_eos=True),
            )
        )
        stale = await worker_stats(engine, num_active_handoffs=3, wait_s=0.2)
        answered_while_busy = not busy.done()
        await busy
        await add
        fresh = await worker_stats(engine, wait_s=5)
        await engine.call(llm_engine.abort, "r1")
        return first, stale, answered_while_busy, fresh

    first, stale, answered_while_busy, fresh = _run(llm_engine, body)
    assert answered_while_busy
    assert stale.num_free_blocks == first.num_free_blocks
    assert stale.num_waiting == first.num_waiting == 0
    assert stale.num_active_handoffs == 3  # the caller's own figures are current
    assert fresh.num_waiting + fresh.num_running == 1  # once free, the engine is read again


def test_the_first_stats_of_an_engine_waits_for_real_figures(llm_engine):
    async def body(engine):
        busy = asyncio.ensure_future(engine.call(time.sleep, 0.5))
        await asyncio.sleep(0)  # the call is queued before Stats asks
        s = await worker_stats(engine, wait_s=0.05)
        return s, busy.done()

    s, busy_done = _run(llm_engine, body)
    assert busy_done  # it waited behind the long call rather than answer with nothing
    assert s.num_total_blocks == 64
