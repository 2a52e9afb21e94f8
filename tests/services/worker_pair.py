"""A prefill and a decode servicer on one in-process grpc.aio server (127.0.0.1), over real
engines, and a Decode.Session driven by hand: what the worker-boundary tests share."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from protos import worker_pb2, worker_pb2_grpc

HOST = "127.0.0.1"


@contextlib.asynccontextmanager
async def serve_worker_pair(p_core, d_core, offer=None, kv=None, lease_s: float = 10):
    """Serve Prefill, Decode and KVTransfer for the two core LLMEngines; yields a channel to
    them. offer/kv: the decode side's KVOffer and DecodeKV (default: grpc only, over
    d_core's cache). Shuts the engines down on exit."""
    from decode_service.servicer import DecodeServicer, KVOffer
    from kvtransfer.base import DecodeKV
    from kvtransfer.channel import CHANNEL_OPTIONS, Channels
    from kvtransfer.ledger import HandoffLedger
    from kvtransfer.receiver import KVTransferServicer
    from kvtransfer.registry import RECEIVERS
    from kvtransfer.select import KVSenders
    from prefill_service.servicer import PrefillServicer
    from tandem.async_engine import AsyncEngine

    p_engine, d_engine = AsyncEngine(p_core), AsyncEngine(d_core)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    addr = f"{HOST}:{server.add_insecure_port(f'{HOST}:0')}"
    ledger = HandoffLedger(lease_s=lease_s)
    kv_cache = d_core.kv_cache
    if offer is None:
        offer, kv = KVOffer(), DecodeKV(kv_cache, tuple(kv_cache.shape))
    prefill = PrefillServicer(p_engine, KVSenders(p_core.kv_cache, channels=Channels(10)))
    worker_pb2_grpc.add_PrefillServicer_to_server(prefill, server)
    decode = DecodeServicer(d_engine, ledger, addr, offer)
    worker_pb2_grpc.add_DecodeServicer_to_server(decode, server)
    receivers = {name: RECEIVERS[name](kv) for name in offer.transports}
    kv_servicer = KVTransferServicer(ledger, receivers)
    worker_pb2_grpc.add_KVTransferServicer_to_server(kv_servicer, server)
    await server.start()
    channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
    try:
        yield channel
    finally:
        await prefill.close()
        await channel.close()
        await server.stop(None)
        p_engine.shutdown()
        d_engine.shutdown()


class Session:
    """One Decode.Session call: requests go up as they are put, events are kept per req_id."""

    def __init__(self, channel) -> None:
        self.up: asyncio.Queue = asyncio.Queue()
        self.call = worker_pb2_grpc.DecodeStub(channel).Session(self._requests())
        self.events: dict[str, list] = {}

    async def _requests(self):
        while (msg := await self.up.get()) is not None:
            yield msg

    def generate(self, req_id, prompt, sampling, local=True, **top) -> None:
        request = worker_pb2.DecodeRequest(
            req_id=req_id, prompt_token_ids=prompt, sampling=sampling, prefill_locally=local, **top
        )
        self.up.put_nowait(worker_pb2.SessionRequest(generate=request))

    async def read_until(self, done) -> None:
        while not done(self.events):
            msg = await asyncio.wait_for(self.call.read(), 60)
            assert msg is not grpc.aio.EOF
            for ev in msg.events:
                self.events.setdefault(ev.req_id, []).append(ev)

    def ended(self, req_id) -> bool:
        evs = self.events.get(req_id, [])
        return bool(evs) and (
            evs[-1].WhichOneof("event") == "error" or evs[-1].tokens.finish_reason != 0
        )

    def tokens(self, req_id) -> list[int]:
        return [t for ev in self.events.get(req_id, []) for t in ev.tokens.token_ids]
