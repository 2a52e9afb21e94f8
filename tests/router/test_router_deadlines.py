"""Deadlines on the decode stream (router/handoff.py): a stream silent past the deadline of
what it owes next (KVTarget: idle timeout, first event after the handoff: handoff timeout, a
local prefill's token: worker timeout, every later event: idle timeout) fails the attempt with
the right worker blamed; the choice migrates to another worker or fails with that detail."""

import asyncio
import logging
import time

import grpc
import pytest
from router_fakes import start_stack

from protos import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.timeout(30)

SCRIPT = [300, 301, 302, 303, 304, 305, 306, 307]
SHORT_S = 0.3  # the deadline under test; the others stay at 60 s (a hang would show as such)


async def generate(stack, max_tokens: int):
    """(tokens received, the AioRpcError that ended the stream or None, seconds taken)."""
    request = router_pb2.GenerateRequest(
        request_id="t",  # choice 0 is t-0, its migrations t-0.1, t-0.2, ...
        token_ids=router_pb2.TokenIds(ids=[5, 6, 7, 8, 9]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )
    tokens, error, t0 = [], None, time.monotonic()
    async with grpc.aio.insecure_channel(stack.address) as ch:
        try:
            async for c in router_pb2_grpc.RouterStub(ch).Generate(request):
                tokens += c.token_ids
        except grpc.aio.AioRpcError as e:
            error = e
    return tokens, error, time.monotonic() - t0


def run(model_dir, stall_after: int, max_tokens: int = 6, **kwargs):
    """Every decode server's first attempt of a request goes silent after stall_after events."""

    async def scenario():
        kwargs.setdefault("handoff_timeout_s", 60.0)
        kwargs.setdefault("stream_idle_timeout_s", 60.0)
        stack = await start_stack(model_dir, SCRIPT, **kwargs)
        try:
            for d in stack.decodes:
                d.state.stall_after = stall_after
            out = await generate(stack, max_tokens)
            await asyncio.sleep(0.1)  # the fire-and-forget Aborts land
            return stack, *out
        finally:
            await stack.stop()

    return asyncio.run(scenario())


def blamed(caplog) -> list[str]:
    return [r.getMessage().split("role=")[1].split()[0] for r in caplog.records
            if "event=worker_failed" in r.getMessage()]  # fmt: skip


def test_decode_silent_mid_stream_migrates_to_another_decode(model_dir, caplog):
    caplog.set_level(logging.WARNING, "tandem.router.handoff")
    # KVTarget, tokens 1 and 2 (token 0 came from the prefill), then nothing
    stack, tokens, error, took = run(
        model_dir, stall_after=3, num_decode=2, stream_idle_timeout_s=SHORT_S
    )
    assert error is None
    assert tokens == SCRIPT[:6]  # none lost or repeated across the migration
    assert SHORT_S <= took < 10
    first, second = sorted(stack.decodes, key=lambda d: "t-0" not in d.state.requests)
    assert (first.state.requests, second.state.requests) == (["t-0"], ["t-0.1"])
    assert "t-0" in first.state.aborted and first.state.active == set()
    assert blamed(caplog) == ["decode"]
    assert f"no decode event within {SHORT_S:g}s" in caplog.text


def test_decode_silent_mid_stream_with_no_other_decode_fails_the_request(model_dir):
    stack, tokens, error, took = run(model_dir, stall_after=3, stream_idle_timeout_s=SHORT_S)
    assert tokens == SCRIPT[:3]  # what came before the silence was streamed
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"no decode event within {SHORT_S:g}s" in error.details()
    assert SHORT_S <= took < 10
    assert stack.decodes[0].state.aborted == ["t-0"] and stack.prefills[0].state.aborted == ["t-0"]


def test_tokens_slower_than_nothing_but_each_within_the_idle_timeout_keep_streaming(model_dir):
    # 8 tokens 0.1 s apart: the stream lasts ~0.8 s, longer than the 0.35 s idle timeout,
    # and every gap is shorter: the deadline moves with each event
    async def scenario():
        stack = await start_stack(
            model_dir, SCRIPT, num_prefill=0, token_delay_s=0.1, stream_idle_timeout_s=0.35
        )
        try:
            return await generate(stack, max_tokens=8)
        finally:
            await stack.stop()

    tokens, error, took = asyncio.run(scenario())
    assert error is None and tokens == SCRIPT
    assert took > 0.7


def test_kv_target_wait_uses_the_idle_timeout_and_blames_decode(model_dir):
    stack, tokens, error, took = run(model_dir, stall_after=0, stream_idle_timeout_s=SHORT_S)
    assert tokens == [] and error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"no KVTarget within {SHORT_S:g}s" in error.details()
    assert SHORT_S <= took < 10
    assert stack.prefills[0].state.requests == []  # no prefill without a KVTarget


def test_no_decode_event_after_the_handoff_blames_the_prefill(model_dir, caplog):
    caplog.set_level(logging.WARNING, "tandem.router.handoff")
    # the KVTarget, then nothing after the KV arrived: the handoff timeout, not the idle one
    stack, tokens, error, took = run(model_dir, stall_after=1, handoff_timeout_s=SHORT_S)
    assert error is None and tokens == SCRIPT[:6]
    assert SHORT_S <= took < 10
    assert blamed(caplog) == ["prefill"]
    assert f"no KV handoff within {SHORT_S:g}s" in caplog.text
    # the decode server was tried again; with the only prefill server blamed, it prefilled
    assert stack.decodes[0].state.requests == ["t-0", "t-0.1"]
    assert stack.prefills[0].state.requests == ["t-0"]
    assert "t-0" in stack.prefills[0].state.aborted


def test_local_prefill_first_token_uses_the_worker_timeout(model_dir):
    stack, tokens, error, took = run(
        model_dir, stall_after=0, num_prefill=0, worker_timeout_s=SHORT_S
    )
    assert tokens == [] and error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"no token from a local prefill within {SHORT_S:g}s" in error.details()
    assert SHORT_S <= took < 10
