"""prompt_logprobs across the wire, on real SmolLM2 engines behind the real prefill and decode
servicers (in-process grpc.aio on 127.0.0.1): the prefill server's PrefillResponse and the
decode server's first TokenEvent (local prefill) carry the engine's entries, and the router's
stream_choice yields them on a choice's first batch, prefilled remotely or locally.
tests/core/test_prompt_logprobs.py ties the engine's entries to HF transformers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from decode_service.servicer import DecodeServicer, KVOffer
from kvtransfer.base import DecodeKV
from kvtransfer.channel import CHANNEL_OPTIONS, Channels
from kvtransfer.ledger import HandoffLedger
from kvtransfer.receiver import KVTransferServicer
from kvtransfer.registry import RECEIVERS
from kvtransfer.select import KVSenders
from prefill_service.servicer import PrefillServicer
from protos import common_pb2, worker_pb2, worker_pb2_grpc
from router.handoff import HandoffLimits, stream_choice
from router.policies import make_policy
from router.types import Timing
from router.workers import Role, WorkerPool
from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.records import Logprob, SamplingParams

PROMPT = list(range(300, 341))  # 41 tokens: three 16-token prefill chunks
K = 3
LIMITS = HandoffLimits(120.0, 120.0, 120.0, max_migrations=0)


@pytest.fixture(scope="module")
def engines():
    cfg = EngineConfig(
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        num_blocks=64,
        max_num_batched_tokens=16,
    )
    return LLMEngine(cfg), LLMEngine(cfg)


def _params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(engines) -> list[Logprob]:
    """The engine's own entries, asked for directly (before any server wraps it)."""
    engine = engines[0]
    engine.add_request("ref", PROMPT, _params(prompt_logprobs=K))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                first = out.prompt_logprobs
    assert [lp.token_id for lp in first] == PROMPT[1:]
    return first


def _same(got, want: list[Logprob]) -> None:
    """Wire entries (TokenLogprob messages or router Logprobs) vs the engine's, to fp32."""
    assert [lp.token_id for lp in got] == [lp.token_id for lp in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-6)
        top = [(t.token_id, t.logprob) for t in g.top] if hasattr(g.top, "add") else g.top
        assert [t for t, _ in top] == [t for t, _ in w.top]
        assert [v for _, v in top] == pytest.approx([v for _, v in w.top], abs=1e-6)


@contextlib.asynccontextmanager
async def _serve(prefill_engine, decode_engine):
    """Prefill, decode and KV transfer on one in-process server (grpc KV transport)."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    addr = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    p_async, d_async = AsyncEngine(prefill_engine), AsyncEngine(decode_engine)
    ledger = HandoffLedger(lease_s=30)
    prefill = PrefillServicer(p_async, KVSenders(prefill_engine.kv_cache, channels=Channels(30)))
    worker_pb2_grpc.add_PrefillServicer_to_server(prefill, server)
    kv = DecodeKV(decode_engine.kv_cache, tuple(decode_engine.kv_cache.shape))
    receivers = {"grpc": RECEIVERS["grpc"](kv)}
    worker_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(ledger, receivers), server)
    decode = DecodeServicer(d_async, ledger, addr, KVOffer())
    worker_pb2_grpc.add_DecodeServicer_to_server(decode, server)
    await server.start()
    try:
        yield addr
    finally:
        await prefill.close()
        await server.stop(None)
        p_async.shutdown()
        d_async.shutdown()


def _wire_sampling(prompt_logprobs: int | None) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    if prompt_logprobs is not None:
        s.prompt_logprobs = prompt_logprobs
    return s


async def _session_events(channel, req_id: str, local: bool, sampling) -> list:
    """One request on a Decode.Session of its own: its events until the last."""
    up: asyncio.Queue = asyncio.Queue()
    up.put_nowait(
        worker_pb2.SessionRequest(
            generate=worker_pb2.DecodeRequest(
                req_id=req_id, prompt_token_ids=PROMPT, sampling=sampling, prefill_locally=local
            )
        )
    )

    async def requests():
        while (msg := await up.get()) is not None:
            yield msg

    call = worker_pb2_grpc.DecodeStub(channel).Session(requests())
    events = []
    while True:
        msg = await asyncio.wait_for(call.read(), 120)
        assert msg is not grpc.aio.EOF
        events += list(msg.events)
        ev = events[-1]
        if ev.WhichOneof("event") == "error":
            raise AssertionError(ev.error.message)
        if ev.WhichOneof("event") == "tokens" and ev.tokens.finish_reason:
            up.put_nowait(None)
            return events
        if ev.WhichOneof("event") == "kv_target" and not local:
            prefill = worker_pb2_grpc.PrefillStub(channel)
            resp = await prefill.Prefill(
                worker_pb2.PrefillRequest(
                    req_id=req_id,
                    prompt_token_ids=PROMPT,
                    sampling=sampling,
                    kv_target=ev.kv_target,
                )
            )
            events.append(resp)


def test_servers_carry_them_on_the_first_answer(engines, reference):
    async def main():
        async with _serve(*engines) as addr:
            async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as channel:
                remote = await _session_events(channel, "remote", False, _wire_sampling(K))
                local = await _session_events(channel, "local", True, _wire_sampling(K))
                plain = await _session_events(channel, "plain", True, _wire_sampling(None))
        return remote, local, plain

    remote, local, plain = asyncio.run(main())
    resp = next(e for e in remote if isinstance(e, worker_pb2.PrefillResponse))
    _same(resp.prompt_logprobs, reference)
    # the decode server computed no prompt (the KV came from the prefill server)
    assert not any(e.tokens.prompt_logprobs for e in remote if hasattr(e, "tokens"))
    tokens = [e.tokens for e in local if e.WhichOneof("event") == "tokens"]
    _same(tokens[0].prompt_logprobs, reference)
    assert not any(t.prompt_logprobs for t in tokens[1:])
    assert not any(e.tokens.prompt_logprobs for e in plain)
    for engine in engines:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stream_choice_yields_them_on_the_first_batch(engines, reference):
    async def choice(pool, req_id: str, params: SamplingParams) -> list:
        policy = make_policy("least_load")
        stream = stream_choice(
            pool, policy, req_id, PROMPT, params, Timing(), time.monotonic(), LIMITS
        )
        return [batch async for batch in stream]

    async def main():
        async with _serve(*engines) as addr:
            both, decode_only = WorkerPool(), WorkerPool()
            both.add(Role.PREFILL, addr, True, kv_address=addr, block_size=16)
            for pool in (both, decode_only):
                pool.add(Role.DECODE, addr, True, kv_address=addr, block_size=16)
            try:
                remote = await choice(both, "c-remote", _params(prompt_logprobs=K))
                local = await choice(decode_only, "c-local", _params(prompt_logprobs=K))
                plain = await choice(both, "c-plain", _params())
            finally:
                await both.close()
                await decode_only.close()
        return both, decode_only, remote, local, plain

    both, decode_only, remote, local, plain = asyncio.run(main())
    assert both.prefill_decisions["remote"] == 2 and decode_only.prefill_decisions["local"] == 1
    for batches in (remote, local):
        _same(batches[0].prompt_logprobs, reference)
        assert all(b.prompt_logprobs == [] for b in batches[1:])
        assert sum(len(b.token_ids) for b in batches) == 3
    assert all(b.prompt_logprobs == [] for b in plain)
