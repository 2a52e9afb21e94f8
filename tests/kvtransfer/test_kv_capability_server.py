"""The handoff capability against a real decode server with its prefix cache on (SmolLM2 on
CPU, in-process grpc.aio on 127.0.0.1), a real prefill server doing the legitimate pushes:
an attacker's Transfer calls, with a wrong capability or with the right one aimed at the
cached prefix blocks shared with other requests, change none of the cached KV; every request
sharing that prefix still answers exactly as before, and no KV block leaks."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import torch

from decode_service.servicer import DecodeServicer, KVOffer
from kvtransfer.base import DecodeKV
from kvtransfer.channel import CHANNEL_OPTIONS, HANDOFF_ID_KEY, Channels
from kvtransfer.ledger import HandoffLedger
from kvtransfer.receiver import KVTransferServicer
from kvtransfer.registry import RECEIVERS
from kvtransfer.select import KVSenders
from kvtransfer.wire import chunk_to_proto
from prefill_service.servicer import PrefillServicer
from protos import common_pb2, worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine
from tandem.records import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BLOCK_SIZE, NUM_BLOCKS, MAX_TOKENS = 16, 128, 6
SYSTEM = list(range(2000, 2048))  # a 3-block "system prompt" every request shares
PROMPTS = {name: SYSTEM + list(range(base, base + 9)) for name, base in
           (("a", 300), ("b", 400), ("c", 500))}  # fmt: skip


@pytest.fixture(scope="module")
def engines():
    cfg = EngineConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_batched_tokens=64)
    prefill, decode = LLMEngine(cfg), LLMEngine(cfg)
    want = {}
    for name, prompt in PROMPTS.items():  # the answers, straight from one engine
        req = prefill.add_request(
            name, prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
        while prefill.has_unfinished():
            prefill.step()
        want[name] = req.output_token_ids
    return prefill, decode, want


class Stack:
    """Decode (with KVTransfer) and prefill servicers on one in-process server."""

    def __init__(self, prefill_engine, decode_engine) -> None:
        self.decode_engine = decode_engine
        self.p_async, self.d_async = AsyncEngine(prefill_engine), AsyncEngine(decode_engine)

    @contextlib.asynccontextmanager
    async def serving(self):
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        self.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        senders = KVSenders(self.p_async.engine.kv_cache, channels=Channels(10))
        prefill = PrefillServicer(self.p_async, senders)
        kv_cache = self.decode_engine.kv_cache
        kv = DecodeKV(kv_cache, tuple(kv_cache.shape))
        ledger = HandoffLedger(lease_s=20)
        decode = DecodeServicer(self.d_async, ledger, self.address, KVOffer())
        worker_pb2_grpc.add_PrefillServicer_to_server(prefill, server)
        worker_pb2_grpc.add_DecodeServicer_to_server(decode, server)
        worker_pb2_grpc.add_KVTransferServicer_to_server(
            KVTransferServicer(ledger, {"grpc": RECEIVERS["grpc"](kv)}), server
        )
        await server.start()
        self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.decode = worker_pb2_grpc.DecodeStub(self.channel)
        self.prefill = worker_pb2_grpc.PrefillStub(self.channel)
        try:
            yield self
        finally:
            await prefill.close()
            await self.channel.close()
            await server.stop(None)
            self.p_async.shutdown()
            self.d_async.shutdown()

    async def target(self, req_id: str):
        """A Session with one remote-prefill request: its KVTarget, and the session."""
        up: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (msg := await up.get()) is not None:
                yield msg

        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        generate = worker_pb2.DecodeRequest(
            req_id=req_id, prompt_token_ids=PROMPTS[req_id[0]], sampling=sampling
        )
        up.put_nowait(worker_pb2.SessionRequest(generate=generate))
        session = self.decode.Session(requests())
        first = (await asyncio.wait_for(session.read(), 30)).events[0]
        assert first.WhichOneof("event") == "kv_target", first
        return first.kv_target, session, up

    async def rest(self, session, up) -> tuple[list[int], worker_pb2.SessionEvent | None]:
        """The session's tokens until its request ended, and its error event (if any)."""
        tokens, error = [], None
        while True:
            msg = await asyncio.wait_for(session.read(), 60)
            assert msg is not grpc.aio.EOF
            for ev in msg.events:
                if ev.WhichOneof("event") == "error":
                    error = ev
                else:
                    tokens.extend(ev.tokens.token_ids)
            if error is not None or any(ev.tokens.finish_reason for ev in msg.events):
                up.put_nowait(None)
                return tokens, error

    async def legit(self, req_id: str, target=None, session=None, up=None) -> list[int]:
        """The router's remote prefill: the KVTarget to the real prefill server, then the
        decode server's tokens."""
        if target is None:
            target, session, up = await self.target(req_id)
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        resp = await self.prefill.Prefill(
            worker_pb2.PrefillRequest(
                req_id=req_id,
                prompt_token_ids=PROMPTS[req_id[0]],
                sampling=sampling,
                kv_target=target,
            )
        )
        tokens, error = await self.rest(session, up)
        assert error is None, error
        return [resp.token_id, *tokens]

    async def attack(self, target, capability: bytes, offset: int) -> worker_pb2.KVTransferReply:
        """A grpc Transfer into the target's block `offset`, all layers, garbage KV."""
        kv = self.decode_engine.kv_cache
        shape = [kv.shape[0], 2, 1, *kv.shape[3:]]
        garbage = chunk_to_proto(0, shape[0], offset, torch.full(shape, 3e4, dtype=kv.dtype))
        stub = worker_pb2_grpc.KVTransferStub(self.channel)
        call = stub.Transfer(metadata=((HANDOFF_ID_KEY, target.handoff_id),))
        begin = worker_pb2.KVBegin(transport="grpc", num_slabs=1, capability=capability)
        await call.write(worker_pb2.KVTransferMessage(handoff_id=target.handoff_id, begin=begin))
        reply = await call.read()
        if reply.reply == worker_pb2.KV_REPLY_GRANT:
            await call.write(
                worker_pb2.KVTransferMessage(handoff_id=target.handoff_id, chunk=garbage)
            )
            reply = await call.read()
        call.cancel()
        return reply

    def blocks(self, block_ids) -> bytes:
        kv = self.decode_engine.kv_cache
        return bytes(kv[:, :, list(block_ids)].contiguous().view(torch.uint8).numpy())

    async def idle(self) -> list[worker_pb2.WorkerStats]:
        """Both servers' Stats once nothing runs (waits for the cleanups)."""
        for _ in range(200):
            stats = [await self.decode.Stats(worker_pb2.StatsRequest())]
            stats.append(await worker_pb2_grpc.PrefillStub(self.channel).Stats(
                worker_pb2.StatsRequest()
            ))  # fmt: skip
            if all(s.num_running == s.num_active_handoffs == 0 for s in stats) and all(
                s.num_free_blocks == s.num_total_blocks for s in stats
            ):
                break
            await asyncio.sleep(0.05)
        return stats


def test_attacks_on_a_live_handoff_change_no_cached_kv_and_leak_nothing(engines):
    prefill_engine, decode_engine, want = engines

    async def main():
        got, refusals = {}, {}
        async with Stack(prefill_engine, decode_engine).serving() as s:
            got["a"] = await s.legit("a")  # the system prompt's blocks now cached at decode

            # (a) a stranger's Transfer for b's live handoff: wrong, then missing capability
            target, session, up = await s.target("b")
            first_block = target.num_cached_tokens // BLOCK_SIZE
            assert first_block == len(SYSTEM) // BLOCK_SIZE  # served from the prefix cache
            cached = list(target.block_ids[:first_block])
            before = s.blocks(cached)
            refusals["wrong"] = await s.attack(target, bytes(32), first_block)
            refusals["missing"] = await s.attack(target, b"", first_block)
            got["b"] = await s.legit("b", target, session, up)  # still completes, right KV

            # (b) the holder of c's capability aims a chunk at the cached prefix block 0
            target, session, up = await s.target("c")
            refusals["prefix"] = await s.attack(target, target.capability, 0)
            _, error = await s.rest(session, up)
            refusals["c_error"] = error
            after = s.blocks(cached)

            # every request sharing the prefix answers as before
            got["c"] = await s.legit("c")
            got["a again"] = await s.legit("a")
            stats = await s.idle()
        return got, refusals, before == after, stats

    got, refusals, unchanged, stats = asyncio.run(main())
    assert refusals["wrong"].reply == refusals["missing"].reply == worker_pb2.KV_REPLY_STOP
    assert "capability does not match" in refusals["missing"].error
    assert refusals["prefix"].reply == worker_pb2.KV_REPLY_STOP
    assert "cached prefix" in refusals["prefix"].error
    assert refusals["c_error"].error.code == grpc.StatusCode.ABORTED.value[0]
    assert unchanged  # the cached prefix blocks, byte for byte
    assert got == {"a": want["a"], "b": want["b"], "c": want["c"], "a again": want["a"]}
    for s in stats:  # (e) no block leaked, no handoff left, on either server
        assert (s.num_running, s.num_active_handoffs) == (0, 0)
        assert s.num_free_blocks == s.num_total_blocks == NUM_BLOCKS


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"capability": b""}, "capability"),
        ({"decode_kv_address": "127.0.0.1:0"}, "decode_kv_address"),
        ({"decode_kv_address": "unix:/tmp/x"}, "decode_kv_address"),
    ],
)
def test_prefill_refuses_a_target_no_decode_server_issued(engines, change, field):
    prefill_engine, decode_engine, _ = engines

    async def main():
        async with Stack(prefill_engine, decode_engine).serving() as s:
            target, session, up = await s.target("a")
            forged = worker_pb2.KVTarget()
            forged.CopyFrom(target)
            for name, value in change.items():
                setattr(forged, name, value)
            request = worker_pb2.PrefillRequest(
                req_id="a", prompt_token_ids=PROMPTS["a"], kv_target=forged
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.prefill.Prefill(request)
            up.put_nowait(None)
            session.cancel()
            stats = await s.idle()
            return err.value, stats

    err, stats = asyncio.run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
    assert all(s.num_free_blocks == s.num_total_blocks for s in stats)
