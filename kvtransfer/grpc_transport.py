"""The `grpc` KV transport: KV slabs as raw bytes in a client stream of KVChunk messages.

Works across hosts. Each chunk stays below the channel's message limit (plan_slices); only
tensor bytes and their shape/dtype travel, never pickle.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from decode_service.convert import logprob_from_proto, logprob_to_proto
from kvtransfer.base import HandoffState, KVDest, KVSlice
from kvtransfer.ledger import HandoffFailed, HandoffLedger
from protos import worker_pb2, worker_pb2_grpc
from tandem.request import Logprob

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20  # channel/server limit; chunks aim at CHUNK_BYTES
CHUNK_BYTES = 4 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class GrpcKVSender:
    """Prefill side: one channel per decode address, reused across handoffs."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> worker_pb2_grpc.KVTransferStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS
            )
        return worker_pb2_grpc.KVTransferStub(ch)

    async def send(
        self,
        dest: KVDest,
        slices: list[KVSlice],
        first_token_id: int,
        first_logprob: Logprob | None,
    ) -> None:
        async def chunks():
            for s in slices:
                data = s.data.contiguous()
                if data.device.type != "cpu":
                    data = await asyncio.to_thread(data.cpu)
                yield worker_pb2.KVChunk(
                    handoff_id=dest.handoff_id,
                    layer_start=s.layer_start,
                    layer_end=s.layer_end,
                    block_offset=s.block_offset,
                    num_blocks=data.shape[2],
                    dtype=_dtype_name(data.dtype),
                    shape=list(data.shape),
                    data=data.view(torch.uint8).numpy().tobytes(),
                )
            last = worker_pb2.KVChunk(
                handoff_id=dest.handoff_id, last=True, first_token_id=first_token_id
            )
            lp = logprob_to_proto(first_logprob)
            if lp is not None:
                last.first_token_logprob.CopyFrom(lp)
            yield last

        result = await self._stub(dest.address).Push(chunks(), timeout=self.timeout_s)
        if not result.ok:
            raise HandoffFailed(f"decode server refused the KV: {result.error}")

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class KVTransferServicer(worker_pb2_grpc.KVTransferServicer):
    """Decode side: stores each chunk into the handoff's reserved blocks."""

    def __init__(self, ledger: HandoffLedger, kv_cache: torch.Tensor) -> None:
        self.ledger = ledger
        self.kv_cache = kv_cache

    def _store(self, block_ids: list[int], chunk: worker_pb2.KVChunk) -> None:
        cache = self.kv_cache
        shape = tuple(chunk.shape)
        want = (
            chunk.layer_end - chunk.layer_start,
            *cache.shape[1:2],
            chunk.num_blocks,
            *cache.shape[3:],
        )
        if shape != want or chunk.dtype != _dtype_name(cache.dtype):
            raise HandoffFailed(
                f"chunk shape {shape}/{chunk.dtype} does not fit {want}/{cache.dtype}"
            )
        if not 0 <= chunk.layer_start < chunk.layer_end <= cache.shape[0]:
            raise HandoffFailed("chunk layers out of range")
        if chunk.block_offset < 0 or chunk.block_offset + chunk.num_blocks > len(block_ids):
            raise HandoffFailed("chunk blocks out of range")
        t = torch.frombuffer(bytearray(chunk.data), dtype=getattr(torch, chunk.dtype)).view(shape)
        dst = block_ids[chunk.block_offset : chunk.block_offset + chunk.num_blocks]
        index = torch.tensor(dst, device=cache.device)
        cache[chunk.layer_start : chunk.layer_end].index_copy_(
            2, index, t.to(cache.device, non_blocking=False)
        )

    async def Push(self, request_iterator, context):
        handoff_id = ""
        try:
            async for chunk in request_iterator:
                handoff_id = chunk.handoff_id
                h = self.ledger.get_active(handoff_id)
                if chunk.last:
                    lp = logprob_from_proto(
                        chunk.first_token_logprob, chunk.HasField("first_token_logprob")
                    )
                    self.ledger.complete(h, chunk.first_token_id, lp)
                    return worker_pb2.KVPushResult(ok=True)
                self.ledger.receiving(h)
                await asyncio.to_thread(self._store, h.block_ids, chunk)
        except (HandoffFailed, ValueError, RuntimeError) as e:
            self.ledger.fail(handoff_id, HandoffState.FAILED, str(e))
            return worker_pb2.KVPushResult(ok=False, error=str(e))
        except asyncio.CancelledError:
            self.ledger.fail(handoff_id, HandoffState.FAILED, "sender went away")
            raise
        self.ledger.fail(handoff_id, HandoffState.FAILED, "stream ended without the last chunk")
        return worker_pb2.KVPushResult(ok=False, error="stream ended without the last chunk")
