"""The `grpc` KV transport: the KV's bytes ride the Transfer call itself, one chunk per slab.

Works across hosts and at any tensor-parallel size: the sender reads a copy of the KV with
every KV head (its blocks are released before the push), the receiver stores each chunk into
the reserved blocks (at tensor-parallel size > 1 through the engine, which scatters the heads
over its ranks). Chunks stay far below the channel's message limit.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import torch

from kvtransfer import wire
from kvtransfer.base import Grant, HandoffFailed, KVDest, KVReceiver, KVSender, KVSource
from kvtransfer.channel import TransferCall
from protos import worker_pb2
from tandem.records import Logprob

CHUNK_BYTES = 4 * 2**20  # one chunk's KV bytes, at most (unless one block over one layer is more)


class KVSlice(NamedTuple):
    """A slab of a source: layers [layer_start, layer_end) x its blocks [block_start, block_end)."""

    layer_start: int
    layer_end: int
    block_start: int  # index into KVSource.block_ids
    block_end: int


def plan_slices(cache: torch.Tensor, num_blocks: int, max_bytes: int) -> list[KVSlice]:
    """Cut num_blocks blocks of a cache [layers, 2, blocks, block_size, kv_heads, head_dim]
    into slices of at most max_bytes each. A slice covers whole blocks across a range of
    layers; blocks are grouped first, layers split only when one block over all layers is
    already over the limit."""
    num_layers = cache.shape[0]
    per_block_layer = cache[0, :, 0].numel() * cache.element_size()
    layers_per_slice = max(1, min(num_layers, max_bytes // per_block_layer))
    blocks_per_slice = max(1, max_bytes // (per_block_layer * layers_per_slice))
    slices = []
    for b0 in range(0, num_blocks, blocks_per_slice):
        b1 = min(num_blocks, b0 + blocks_per_slice)
        for l0 in range(0, num_layers, layers_per_slice):
            slices.append(KVSlice(l0, min(num_layers, l0 + layers_per_slice), b0, b1))
    return slices


def slice_data(source: KVSource, s: KVSlice) -> torch.Tensor:
    """The slice's KV as a contiguous CPU tensor [layers, 2, blocks, block_size, heads, dim]."""
    ids = source.block_ids[s.block_start : s.block_end]
    index = torch.tensor(ids, device=source.cache.device)
    return source.cache[s.layer_start : s.layer_end].index_select(2, index).cpu().contiguous()


class GrpcSender(KVSender):
    name = "grpc"
    holds_blocks = False  # a copy: the prefill's blocks go back before the push

    async def send(
        self, dest: KVDest, source: KVSource, first_token_id: int, first_logprob: Logprob | None
    ) -> None:
        slices = plan_slices(source.cache, len(source.block_ids), CHUNK_BYTES)

        def chunk(s: KVSlice) -> worker_pb2.KVTransferMessage:  # on a worker thread
            data = slice_data(source, s)
            offset = dest.first_block + s.block_start  # into KVTarget.block_ids
            msg = wire.chunk_to_proto(s.layer_start, s.layer_end, offset, data)
            return worker_pb2.KVTransferMessage(chunk=msg)

        async with TransferCall(self.channels, dest) as call:
            await call.begin(self.name, len(slices))
            for s in slices:
                if call.stopped:
                    break
                await call.send(await asyncio.to_thread(chunk, s))
            await call.finish(first_token_id, first_logprob)


class GrpcReceiver(KVReceiver):
    """Stores each chunk into the handoff's reserved blocks, off the event loop. Chunks carry
    every KV head (the TP=1 layout); at tensor-parallel size > 1 `DecodeKV.write` scatters
    them over the ranks on the engine thread."""

    name = "grpc"
    progress = "chunk"
    sender_writes = False

    def _decode(self, grant: Grant, chunk: worker_pb2.KVChunk):
        """The chunk's (destination block ids, tensor), checked against the pool and the
        grant; HandoffFailed before anything is stored when it does not fit."""
        cache, pool = self.kv.kv_cache, self.kv.kv_shape
        if not 0 <= chunk.layer_start < chunk.layer_end <= pool[0]:
            raise HandoffFailed(
                f"chunk layers [{chunk.layer_start}, {chunk.layer_end}) are outside the pool's"
                f" {pool[0]}"
            )
        b0, b1 = chunk.block_offset, chunk.block_offset + chunk.num_blocks
        if chunk.num_blocks < 1 or b1 > len(grant.block_ids):
            raise HandoffFailed(
                f"chunk blocks [{b0}, {b1}) are outside the {len(grant.block_ids)} reserved"
            )
        if b0 < grant.first_block:  # the prefix cache: other requests read these blocks
            raise HandoffFailed(
                f"chunk blocks [{b0}, {b1}) reach into the decode server's cached prefix"
                f" (blocks below {grant.first_block} are not the sender's to write)"
            )
        shape = tuple(chunk.shape)
        want = (chunk.layer_end - chunk.layer_start, *pool[1:2], chunk.num_blocks, *pool[3:])
        if shape != want or chunk.dtype != wire.dtype_name(cache.dtype):
            raise HandoffFailed(
                f"chunk shape {shape}/{chunk.dtype} does not fit {want}/{cache.dtype}"
            )
        t = wire.chunk_from_proto(chunk)
        return list(grant.block_ids[b0:b1]), t

    def _store(self, grant: Grant, chunk: worker_pb2.KVChunk) -> None:
        dst, t = self._decode(grant, chunk)
        cache = self.kv.kv_cache
        index = torch.tensor(dst, device=cache.device)
        cache[chunk.layer_start : chunk.layer_end].index_copy_(2, index, t.to(cache.device))

    async def receive(self, grant: Grant, slab: int, chunk: worker_pb2.KVChunk) -> None:
        loop = asyncio.get_running_loop()
        if self.kv.write is None:
            await loop.run_in_executor(None, self._store, grant, chunk)
            return
        dst, t = await loop.run_in_executor(None, self._decode, grant, chunk)
        await self.kv.write(dst, chunk.layer_start, chunk.layer_end, t)
