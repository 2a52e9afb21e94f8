"""The `grpc` KV transport: KV slabs as raw bytes in a client stream of KVChunk messages.

Works across hosts. Each chunk stays below the channel's message limit (plan_slices); only
tensor bytes and their shape/dtype travel, never pickle. The handoff id also rides in the
call's metadata, so the receiver ties the stream to its ledger entry before the first chunk:
a sender that dies or is cancelled at any point fails the handoff at once, and a stalled
stream fails after the ledger's stall_s, not after the lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
import torch

from kvtransfer import faults
from kvtransfer.base import HandoffState, KVDest, KVSlice
from kvtransfer.ledger import HandoffFailed, HandoffLedger
from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel
from tandem.request import Logprob
from worker.convert import logprob_from_proto, logprob_to_proto

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20  # channel/server limit; chunks aim at CHUNK_BYTES
CHUNK_BYTES = 4 * 2**20
HANDOFF_ID_KEY = "tandem-handoff-id"  # call metadata: KVTarget.handoff_id of the stream
# HTTP/2 keepalive: a peer that stops answering pings (SIGSTOP, host gone, cable pulled: no
# TCP reset) fails every call on the connection within ~15 s, busy or idle, so streams and
# handoffs to it end instead of hanging. A live process answers pings from gRPC's own I/O
# even while its engine is busy. Servers must accept pings this often (the last two).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HandoffRefused(HandoffFailed):
    """The receiver answered and said no (its handoff had already ended, bad chunk, ...)."""


async def _data_chunk(handoff_id: str, s: KVSlice) -> worker_pb2.KVChunk:
    data = s.data.contiguous()
    if data.device.type != "cpu":
        data = await asyncio.to_thread(data.cpu)
    return worker_pb2.KVChunk(
        handoff_id=handoff_id,
        layer_start=s.layer_start,
        layer_end=s.layer_end,
        block_offset=s.block_offset,
        num_blocks=data.shape[2],
        dtype=dtype_name(data.dtype),
        shape=list(data.shape),
        data=data.view(torch.uint8).numpy().tobytes(),
    )


class GrpcKVSender:
    """Prefill side: one channel per decode address, reused across handoffs (and by the
    same-host transports' control stream)."""

    def __init__(self, timeout_s: float = 60.0, tls: TLSConfig = PLAINTEXT) -> None:
        self.timeout_s = timeout_s
        self.tls = tls  # the prefill server's files, as client credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = aio_channel(address, self.tls, CHANNEL_OPTIONS)
        return ch

    def stub(self, address: str) -> worker_pb2_grpc.KVTransferStub:
        return worker_pb2_grpc.KVTransferStub(self.channel(address))

    async def send(
        self,
        dest: KVDest,
        slices: list[KVSlice],
        first_token_id: int,
        first_logprob: Logprob | None,
    ) -> None:
        call = self.stub(dest.address).Push(
            timeout=self.timeout_s, metadata=((HANDOFF_ID_KEY, dest.handoff_id),)
        )
        try:
            try:
                for s in slices:
                    await call.write(await _data_chunk(dest.handoff_id, s))
                if faults.stalls_kv_push(dest.req_id):  # test-only: no last chunk
                    await faults.stall_forever(dest.handoff_id)
                last = worker_pb2.KVChunk(
                    handoff_id=dest.handoff_id, last=True, first_token_id=first_token_id
                )
                lp = logprob_to_proto(first_logprob)
                if lp is not None:
                    last.first_token_logprob.CopyFrom(lp)
                await call.write(last)
                await call.done_writing()
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                pass  # the receiver may have answered early (refused): `await call` says
            result = await call  # raises when the call itself failed
        finally:
            call.cancel()  # no-op once finished; if we were cancelled, the receiver sees it
        if not result.ok:
            raise HandoffRefused(f"decode server refused the KV: {result.error}")

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


# Tensor parallel decode side: (block ids, layer_start, layer_end, all-heads KV) -> stored in
# every rank's pool, run on the engine thread (it broadcasts to the other ranks)
KVWrite = Callable[[list[int], int, int, torch.Tensor], Awaitable[None]]


class KVTransferServicer(worker_pb2_grpc.KVTransferServicer):
    """Decode side: stores each chunk into the handoff's reserved blocks.

    Chunks always carry every KV head (the TP=1 layout). At tensor-parallel size > 1 the
    servicer gets the pool's all-heads shape (kv_shape) and a `write` that scatters the heads
    over the ranks; otherwise it copies into kv_cache itself, off the event loop.
    """

    def __init__(
        self,
        ledger: HandoffLedger,
        kv_cache: torch.Tensor,
        kv_shape: tuple[int, ...] | None = None,
        write: KVWrite | None = None,
    ) -> None:
        self.ledger = ledger
        self.kv_cache = kv_cache
        self.kv_shape = tuple(kv_shape or kv_cache.shape)
        self.write = write

    def _decode(self, block_ids: list[int], chunk: worker_pb2.KVChunk):
        """The chunk's (destination block ids, tensor), checked against the pool."""
        cache, pool = self.kv_cache, self.kv_shape
        shape = tuple(chunk.shape)
        want = (chunk.layer_end - chunk.layer_start, *pool[1:2], chunk.num_blocks, *pool[3:])
        if shape != want or chunk.dtype != dtype_name(cache.dtype):
            raise HandoffFailed(
                f"chunk shape {shape}/{chunk.dtype} does not fit {want}/{cache.dtype}"
            )
        if not 0 <= chunk.layer_start < chunk.layer_end <= pool[0]:
            raise HandoffFailed("chunk layers out of range")
        if chunk.block_offset < 0 or chunk.block_offset + chunk.num_blocks > len(block_ids):
            raise HandoffFailed("chunk blocks out of range")
        t = torch.frombuffer(bytearray(chunk.data), dtype=getattr(torch, chunk.dtype)).view(shape)
        return block_ids[chunk.block_offset : chunk.block_offset + chunk.num_blocks], t

    def _store(self, block_ids: list[int], chunk: worker_pb2.KVChunk) -> None:
        dst, t = self._decode(block_ids, chunk)
        cache = self.kv_cache
        index = torch.tensor(dst, device=cache.device)
        cache[chunk.layer_start : chunk.layer_end].index_copy_(
            2, index, t.to(cache.device, non_blocking=False)
        )

    async def _store_tp(self, block_ids: list[int], chunk: worker_pb2.KVChunk) -> None:
        loop = asyncio.get_running_loop()
        dst, t = await loop.run_in_executor(None, self._decode, block_ids, chunk)
        await self.write(dst, chunk.layer_start, chunk.layer_end, t)

    async def Push(self, request_iterator, context):
        handoff_id = dict(context.invocation_metadata()).get(HANDOFF_ID_KEY, "")
        try:
            if handoff_id:  # a sender that names its handoff up front: stall deadline armed
                self.ledger.receiving(self.ledger.get_active(handoff_id))
            chunks = request_iterator.__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), timeout=self.ledger.stall_s)
                except StopAsyncIteration:
                    raise HandoffFailed("stream ended without the last chunk") from None
                except asyncio.TimeoutError:
                    raise HandoffFailed(
                        f"KV stream stalled: no chunk for {self.ledger.stall_s:g}s"
                    ) from None
                if handoff_id and chunk.handoff_id != handoff_id:
                    raise HandoffFailed("chunk handoff_id differs from the stream's")
                handoff_id = chunk.handoff_id
                h = self.ledger.get_active(handoff_id)
                if chunk.last:
                    lp = logprob_from_proto(
                        chunk.first_token_logprob, chunk.HasField("first_token_logprob")
                    )
                    self.ledger.complete(h, chunk.first_token_id, lp)
                    return worker_pb2.KVPushResult(ok=True)
                self.ledger.receiving(h)
                if self.write is None:
                    h.store = asyncio.get_running_loop().run_in_executor(
                        None, self._store, h.block_ids, chunk
                    )
                else:
                    h.store = asyncio.ensure_future(self._store_tp(h.block_ids, chunk))
                await asyncio.shield(h.store)
        except (HandoffFailed, ValueError, RuntimeError) as e:
            self.ledger.fail(handoff_id, HandoffState.FAILED, str(e))
            log.info("event=kv_receive_failed handoff=%s error=%s", handoff_id, e)
            return worker_pb2.KVPushResult(ok=False, error=str(e))
        except asyncio.CancelledError:
            self.ledger.fail(handoff_id, HandoffState.FAILED, "sender went away")
            raise
