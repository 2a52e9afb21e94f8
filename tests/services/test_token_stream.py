"""The decode server's token path: AsyncEngine's OutputStream (one callback per step, pending
outputs merged when the consumer is behind) and the TokenEvent built from a StepOutput.
Real SmolLM2 engine; no timing assertions (how fast it is lives in bench/decode_token_path.py)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from decode_service.servicer import _fill_tokens
from protos import common_pb2, worker_pb2
from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.engine_records import EngineDeadError, StepOutput
from tandem.output_stream import _merge
from tandem.records import Logprob, SamplingParams

PROMPT = [1, 9690, 314, 260, 3575, 282, 4649]


@pytest.fixture(scope="module")
def llm_engine():
    return LLMEngine(EngineConfig(num_blocks=128, max_num_batched_tokens=64))


@pytest.fixture(scope="module")
def reference(llm_engine):
    """Greedy tokens and logprobs of PROMPT, stepped on the engine directly."""
    req = llm_engine.add_request("ref", PROMPT, _greedy(8, logprobs=2))
    while llm_engine.has_unfinished():
        llm_engine.step()
    return req.output_token_ids, req.logprobs


def _greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def _run(llm_engine, body):
    engine = AsyncEngine(llm_engine)
    try:
        return asyncio.run(body(engine))
    finally:
        engine.shutdown()


async def _until(fn, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await fn():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _no_requests(engine: AsyncEngine) -> bool:
    s = await engine.call(engine.engine.stats)
    return s.num_running + s.num_waiting == 0 and not engine.engine.requests


def test_a_consumer_that_keeps_up_gets_every_step_in_order(llm_engine, reference):
    async def body(engine):
        outs = [o async for o in engine.generate("a", PROMPT, _greedy(8, logprobs=2))]
        return outs, await engine.call(engine.engine.stats)

    outs, stats = _run(llm_engine, body)
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == reference[0]
    assert [lp for o in outs for lp in o.new_logprobs] == reference[1]
    assert [o.finish_reason for o in outs] == [None] * (len(outs) - 1) + ["length"]
    assert stats.num_free_blocks == stats.num_total_blocks


def test_a_consumer_that_fell_behind_gets_the_queued_steps_as_one_output(llm_engine, reference):
    async def body(engine):
        stream = await engine.open_stream("b", PROMPT, _greedy(8, logprobs=2))
        # the request finishes with nobody reading: all 8 steps wait in the stream
        await _until(lambda: _no_requests(engine))
        outs = [o async for o in stream]
        await stream.aclose()
        return outs

    outs = _run(llm_engine, body)
    assert len(outs) == 1
    assert outs[0].new_token_ids == reference[0]
    assert outs[0].new_logprobs == reference[1]
    assert outs[0].finish_reason == "length"


def test_leaving_the_stream_early_aborts_the_request_and_frees_its_blocks(llm_engine):
    async def body(engine):
        stream = await engine.open_stream("c", PROMPT, _greedy(10_000))
        first = await stream.__anext__()
        await stream.aclose()
        await stream.aclose()  # idempotent
        freed = await _no_requests(engine)
        after = [o async for o in stream]  # a closed stream yields nothing more
        # the same through generate(): the consuming task is cancelled while it waits
        seen = asyncio.Event()

        async def consume():
            async for _ in engine.generate("d", PROMPT, _greedy(10_000)):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until(lambda: _no_requests(engine))
        stats = await engine.call(engine.engine.stats)
        return first, freed, after, stats, dict(engine._streams)

    first, freed, after, stats, streams = _run(llm_engine, body)
    assert len(first.new_token_ids) >= 1 and first.finish_reason is None
    assert freed and after == []
    assert stats.num_free_blocks == stats.num_total_blocks
    assert streams == {}


def test_a_step_failure_ends_its_requests_and_three_in_a_row_end_the_engine(llm_engine):
    """A step that raises fails the requests it ran (after the tokens they already had) and the
    engine goes on; three failed steps in a row and it is dead: every stream and call says so."""
    engine = AsyncEngine(llm_engine)
    real_step = llm_engine.step
    calls, broken = [], []

    def failing_step():
        calls.append(1)
        if len(calls) == 3 or broken:
            raise RuntimeError("injected step failure")
        return real_step()

    llm_engine.step = failing_step

    async def drain(stream) -> list:
        return [o async for o in stream]

    async def body():
        failed = await drain(await engine.open_stream("e", PROMPT, _greedy(100)))
        after = await drain(await engine.open_stream("f", PROMPT, _greedy(4)))
        broken.append(1)  # from now on every step fails
        with pytest.raises(EngineDeadError, match="injected step failure"):
            await drain(await engine.open_stream("g", PROMPT, _greedy(4)))
        with pytest.raises(EngineDeadError):
            await engine.generate("h", PROMPT, _greedy(4)).__anext__()
        return failed, after

    try:
        failed, after = asyncio.run(body())
    finally:
        del llm_engine.step
        engine.shutdown()
        for req_id in ("g", "h"):  # what the dead engine left behind (the fixture is shared)
            llm_engine.abort(req_id)
    assert len([t for o in failed for t in o.new_token_ids]) == 2  # the two steps that ran
    assert failed[-1].finish_reason == "error" and "injected step failure" in failed[-1].error
    assert [t for o in after for t in o.new_token_ids] and after[-1].finish_reason == "length"


def test_pump_hands_every_output_to_the_sink_in_order_then_returns(llm_engine, reference):
    async def body(engine):
        got: list = []
        stream = await engine.open_stream("p", PROMPT, _greedy(8, logprobs=2))
        await _until(lambda: _no_requests(engine))  # all 8 steps wait in the stream first
        await engine.pump(stream, got.append)  # what queued is handed over at once
        await stream.aclose()
        live: list = []
        stream = await engine.open_stream("q", PROMPT, _greedy(8, logprobs=2))
        await engine.pump(stream, live.append)  # and as the steps come
        await stream.aclose()
        return got, live, dict(engine._streams), await engine.call(engine.engine.stats)

    got, live, streams, stats = _run(llm_engine, body)
    for outs in (got, live):
        assert [t for o in outs for t in o.new_token_ids] == reference[0]
        assert [lp for o in outs for lp in o.new_logprobs] == reference[1]
        assert [o.finish_reason for o in outs][-1] == "length"
    assert len(live) > 1  # one sink call per step, not one merged output
    assert streams == {} and stats.num_free_blocks == stats.num_total_blocks


def test_cancelling_a_pump_aborts_the_request_and_frees_its_blocks(llm_engine):
    async def body(engine):
        got: list = []
        stream = await engine.open_stream("r", PROMPT, _greedy(10_000))

        async def pump():
            try:
                await engine.pump(stream, got.append)
            finally:
                await stream.aclose()

        task = asyncio.create_task(pump())
        await _until(lambda: _async_true(len(got) >= 2))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until(lambda: _no_requests(engine))
        n = len(got)
        await asyncio.sleep(0.2)
        return n, len(got), await engine.call(engine.engine.stats), dict(engine._streams)

    n, later, stats, streams = _run(llm_engine, body)
    assert later == n  # nothing reached the sink after the cancel
    assert stats.num_free_blocks == stats.num_total_blocks and streams == {}


async def _async_true(value: bool) -> bool:
    return value


def test_a_request_id_in_use_is_refused_without_touching_the_open_stream(llm_engine):
    async def body(engine):
        stream = await engine.open_stream("g", PROMPT, _greedy(3))
        with pytest.raises(ValueError, match="already in use"):
            await engine.open_stream("g", PROMPT, _greedy(3))
        outs = [o async for o in stream]
        await stream.aclose()
        return outs

    outs = _run(llm_engine, body)
    assert sum(len(o.new_token_ids) for o in outs) == 3
    assert outs[-1].finish_reason == "length"


def test_merge_keeps_order_and_the_last_finish_and_splits_at_an_error():
    lp = [Logprob(5, -0.1, [(5, -0.1)]), None, Logprob(7, -0.3, [])]
    a = StepOutput("r", [5], [lp[0]], None, 16)
    b = StepOutput("r", [6], [lp[1]], None, 16)
    c = StepOutput("r", [7], [lp[2]], "stop", 16)
    out, rest = _merge([a, b, c])
    assert out == StepOutput("r", [5, 6, 7], lp, "stop", 16) and rest == []
    assert a.new_token_ids == [5]  # the queued outputs are not modified
    err = RuntimeError("x")
    out, rest = _merge([a, b, err, c])
    assert out == StepOutput("r", [5, 6], lp[:2], None, 16) and rest == [err, c]
    assert _merge([err, a]) == (err, [])


def _token_event(out: StepOutput, num_prompt_tokens: int) -> worker_pb2.TokenEvent:
    tokens = worker_pb2.TokenEvent()
    _fill_tokens(tokens, out, num_prompt_tokens)
    return tokens


def test_token_event_matches_the_message_built_field_by_field():
    plain = StepOutput("r", [42], [None], None, 0)
    assert _token_event(plain, 7) == worker_pb2.TokenEvent(token_ids=[42], num_prompt_tokens=7)
    lps = [Logprob(3, -0.25, [(3, -0.25), (9, -1.5)]), Logprob(4, -2.0, [])]
    last = StepOutput("r", [3, 4], lps, "stop", 32)
    want = worker_pb2.TokenEvent(
        token_ids=[3, 4],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        num_prompt_tokens=40,
        num_cached_tokens=32,
        logprobs=[
            common_pb2.TokenLogprob(
                token_id=3,
                logprob=-0.25,
                top=[
                    common_pb2.TopLogprob(token_id=3, logprob=-0.25),
                    common_pb2.TopLogprob(token_id=9, logprob=-1.5),
                ],
            ),
            common_pb2.TokenLogprob(token_id=4, logprob=-2.0),
        ],
    )
    assert _token_event(last, 40) == want
    length = StepOutput("r", [1], [None], "length", 0)
    assert _token_event(length, 1).finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_stream_interval_hands_tokens_n_at_a_time_first_and_last_at_once(
    llm_engine, reference, monkeypatch
):
    """stream_interval=3 over 8 tokens: the engine thread hands the first alone, then 3, 3,
    and the last 1 with the finish; nothing lost or reordered."""
    import tandem.async_engine as ae

    handed: list[int] = []
    deliver = ae._deliver

    def recorded(items):
        handed.extend(len(outs) for _, outs in items)
        deliver(items)

    monkeypatch.setattr(ae, "_deliver", recorded)
    engine = AsyncEngine(llm_engine, stream_interval=3)

    async def body():
        outs = [o async for o in engine.generate("si", PROMPT, _greedy(8, logprobs=2))]
        return outs, await engine.call(engine.engine.stats)

    try:
        outs, stats = asyncio.run(body())
    finally:
        engine.shutdown()
    assert handed == [1, 3, 3, 1]
    assert [t for o in outs for t in o.new_token_ids] == reference[0]
    assert [lp for o in outs for lp in o.new_logprobs] == reference[1]
    assert outs[-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outs[:-1])
    assert stats.num_free_blocks == stats.num_total_blocks
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(llm_engine, stream_interval=0)


def test_a_session_outbox_that_lagged_is_written_in_bounded_messages():
    from decode_service import servicer

    async def body():
        out = servicer._Outbox()
        n = servicer.MAX_SESSION_EVENTS * 2 + 5
        for i in range(n):
            out.add(f"r{i % 7}").tokens.token_ids.append(i)
        msgs = []
        while (m := await out.take(lambda: True)) is not None:
            msgs.append(m)
        return n, msgs

    n, msgs = asyncio.run(body())
    assert [len(m.events) for m in msgs] == [servicer.MAX_SESSION_EVENTS] * 2 + [5]
    assert [ev.tokens.token_ids[0] for m in msgs for ev in m.events] == list(range(n))
