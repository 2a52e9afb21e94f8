"""A worker's waiting queue is bounded: past it the Decode servicer refuses with
RESOURCE_EXHAUSTED (an error event on the session; the router then tries another server or
refuses with a retryable status, 429 at the gateway) and the requests it did admit still
finish, leaving no block behind. In-process grpc.aio server on 127.0.0.1, real SmolLM2
engine."""

from __future__ import annotations

import asyncio

import grpc

from decode_service.servicer import DecodeServicer
from kvtransfer.channel import CHANNEL_OPTIONS
from kvtransfer.ledger import HandoffLedger
from protos import common_pb2, worker_pb2, worker_pb2_grpc
from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine


async def _until(fn, timeout=30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await fn():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_full_waiting_queue_is_refused_with_resource_exhausted():
    # one running sequence, one waiting: the third request finds the queue full
    cfg = EngineConfig(num_blocks=128, max_num_seqs=1, max_num_batched_tokens=32)
    engine = AsyncEngine(LLMEngine(cfg), max_num_waiting=1)

    async def main():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        addr = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        servicer = DecodeServicer(engine, HandoffLedger(lease_s=5), addr)
        worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = worker_pb2_grpc.DecodeStub(ch)

                async def stats():
                    return await stub.Stats(worker_pb2.StatsRequest(), timeout=5)

                up: asyncio.Queue = asyncio.Queue()  # the session's requests
                events: dict[str, list] = {}  # req_id -> its events

                async def requests():
                    while (msg := await up.get()) is not None:
                        yield msg

                async def read(call) -> None:
                    async for msg in call:
                        for ev in msg.events:
                            events.setdefault(ev.req_id, []).append(ev)

                reader = asyncio.create_task(read(stub.Session(requests(), timeout=120)))

                def generate(i: int, max_tokens: int = 4) -> None:
                    sampling = common_pb2.SamplingParams(
                        temperature=0, max_tokens=max_tokens, ignore_eos=True
                    )
                    prompt = list(range(1000 + i, 1200 + i))  # 200 tokens: 7 steps of 32
                    request = worker_pb2.DecodeRequest(
                        req_id=f"q{i}",
                        prompt_token_ids=prompt,
                        sampling=sampling,
                        prefill_locally=True,
                    )
                    up.put_nowait(worker_pb2.SessionRequest(generate=request))

                def tokens(req_id: str) -> int:
                    return sum(len(ev.tokens.token_ids) for ev in events.get(req_id, []))

                async def all_ended() -> bool:
                    last = [events.get(f"q{i}", [None])[-1] for i in range(3)]
                    return all(
                        ev is not None
                        and (ev.WhichOneof("event") == "error" or ev.tokens.finish_reason)
                        for ev in last
                    )

                # long enough that it still runs while the next two arrive
                generate(0, max_tokens=64)
                await _until(lambda: _is(stats, running=1))
                generate(1)
                await _until(lambda: _is(stats, running=1, waiting=1))
                generate(2)
                await _until(all_ended, timeout=120)
                (refused,) = events["q2"]
                assert refused.WhichOneof("event") == "error", "the third request was admitted"
                assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                assert "queue full" in refused.error.message
                assert tokens("q0") == 64 and tokens("q1") == 4
                up.put_nowait(None)  # half-close: the session ends, nothing is left on it
                await reader
                s = await stats()
                assert s.num_free_blocks == s.num_total_blocks and s.num_waiting == 0
        finally:
            await server.stop(None)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


async def _is(stats, running: int = 0, waiting: int = 0) -> bool:
    s = await stats()
    return s.num_running == running and s.num_waiting == waiting
