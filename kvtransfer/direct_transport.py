"""What the same-host KV transports (`shm`, `cuda_ipc`) share: the sender writes the prompt's
KV straight into the decode server's pool; only metadata rides the Transfer call.

They differ only in how the pool is reached and opened (kvtransfer/shm_transport.py,
kvtransfer/cuda_ipc_transport.py). The sender reads the KV from its own held blocks (no
copy) and writes it in slabs (a layer range over all the handoff's blocks), each one gather
from the sender's cache and scatter into the receiver's reserved block ids:

    dst[l0:l1, :, dst_block_ids] = src[l0:l1, :, src_block_ids]

Which blocks: the receiver's grant names them (KVTransferReply.block_ids: the handoff's own
blocks past the decode server's shared prefix cache, from its ledger, for the capability the
call presented); the sender writes exactly those, and nothing at all when they differ from
its KVTarget's (a forged or stale target).

Why the control stream: the receiver may free its reserved blocks only when no write can
land in them. The sender writes only after the receiver's grant, and says `done` once every
slab is written (on the GPU: after its side stream synchronized); between the two a write
may be in flight (`Handoff.store` pending), at any other time none is. A handoff that ends
meanwhile (abort, lease) gets an immediate stop; the sender finishes its current slab, ends
its stream, and only then does the store resolve. A sender that is cancelled mid-slab still
finishes that slab before its call ends; one that dies ends the call by dying. Two round
trips per handoff, whatever the number of slabs. The one case this cannot cover: a sender
frozen mid-slab (SIGSTOP) past the stall deadline and then resumed can land that one slab
after the blocks were freed.
"""

from __future__ import annotations

import abc
import asyncio
import logging

import grpc
import torch

from kvtransfer.base import (
    Endpoint,
    Grant,
    HandoffFailed,
    HandoffRefused,
    KVDest,
    KVReceiver,
    KVSender,
    KVSource,
)
from kvtransfer.channel import TransferCall
from kvtransfer.pool import PoolExport
from protos import worker_pb2
from tandem.records import Logprob
from tandem_kernels.kv_block_copy import copy_kv_blocks_ref

log = logging.getLogger(__name__)

SLAB_BYTES = 128 * 2**20  # one slab's bytes (bounds the gather's temporary and a grant's span)
# On CUDA the Triton block copy needs no temporary: slabs only bound how long a stop may wait
# (1 GiB takes well under a millisecond at HBM speed), and each slab costs a worker-thread hop,
# a stream sync and a progress message, so they are larger there.
GPU_SLAB_BYTES = 1 << 30


def slab_bytes_for(device: torch.device, slab_bytes: int = SLAB_BYTES) -> int:
    return max(slab_bytes, GPU_SLAB_BYTES) if device.type == "cuda" else slab_bytes


# -- the copy ---------------------------------------------------------------------------------
def plan_layer_slabs(kv_cache: torch.Tensor, num_blocks: int, max_bytes: int) -> list[range]:
    """Layer ranges whose KV over num_blocks blocks stays within max_bytes (>= 1 layer each);
    none for no blocks."""
    if num_blocks == 0:
        return []
    per_layer = kv_cache[0, :, 0].numel() * kv_cache.element_size() * num_blocks
    step = max(1, max_bytes // max(1, per_layer))
    n = kv_cache.shape[0]
    return [range(l0, min(n, l0 + step)) for l0 in range(0, n, step)]


def check_pool_layout(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Same layers, block size, heads, head dim and dtype; block counts may differ."""
    if (src.shape[:2], src.shape[3:], src.dtype) != (dst.shape[:2], dst.shape[3:], dst.dtype):
        raise HandoffFailed(
            f"KV layouts differ: this cache {tuple(src.shape)}/{src.dtype}, "
            f"the decode pool {tuple(dst.shape)}/{dst.dtype}"
        )


class SlabWriter:
    """Writes one handoff's slabs (on a worker thread). On CUDA each slab runs on a side stream
    that first waits for the default stream (the prefill's forward), and is synchronized before
    write() returns, so the receiver may read the blocks once told."""

    def __init__(self, src, dst, src_block_ids, dst_block_ids, stream=None) -> None:
        self.src, self.dst, self.stream = src, dst, stream
        self.src_index = torch.tensor(src_block_ids, dtype=torch.long, device=src.device)
        self.dst_index = torch.tensor(dst_block_ids, dtype=torch.long, device=dst.device)

    def write(self, layers: range) -> None:
        l0, l1 = layers.start, layers.stop
        if self.stream is None:
            self._copy(l0, l1)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.default_stream(self.stream.device))
            self._copy(l0, l1)
        self.stream.synchronize()

    def _copy(self, l0: int, l1: int) -> None:
        if self.src.is_cuda and self.src.device == self.dst.device:
            from tandem_kernels.kv_block_copy_triton import copy_kv_blocks_triton

            # block to block, no temporary; the gather/scatter below (index_select +
            # index_copy_) ran at 0.13-0.15 of the copy rate on an H200 (gpu_kv_transport.py)
            copy_kv_blocks_triton(self.src, self.dst, self.src_index, self.dst_index, l0, l1)
        else:
            copy_kv_blocks_ref(self.src, self.dst, self.src_index, self.dst_index, l0, l1)


async def _run_to_end(fut: asyncio.Future) -> None:
    """Await a worker-thread write; if we are cancelled meanwhile, still wait for it to end
    before the cancel goes on (the receiver frees the blocks once our call ends)."""
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise


# -- sender -----------------------------------------------------------------------------------
class DirectSender(KVSender):
    """Prefill side: opens each decode server's pool once (cached by address and pool id;
    dropped when the server goes away or shows a new pool) and writes handoffs into it."""

    holds_blocks = True  # written from the engine's blocks, held until the push ended

    def __init__(self, channels, here: Endpoint, slab_bytes: int = SLAB_BYTES) -> None:
        super().__init__(channels, here)
        self.slab_bytes = slab_bytes
        self._pools: dict[str, tuple[str, torch.Tensor]] = {}  # address -> (pool_id, pool)
        self._watchers: dict[str, asyncio.Task] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @classmethod
    def unreachable(cls, here: Endpoint, pool: PoolExport | None) -> str:
        if pool is None or pool.transport != cls.name:
            return f"the decode server exports no {cls.name} pool"
        if pool.host_id != here.host_id:
            return "the decode server is on another host (or IPC namespace)"
        return cls.unreachable_on_host(here, pool)

    @classmethod
    def unreachable_on_host(cls, here: Endpoint, pool: PoolExport) -> str:
        """Why not, though both are on one host ("" when the pool can be written)."""
        return ""

    @abc.abstractmethod
    def open_pool(self, export: PoolExport) -> torch.Tensor:
        """The exported pool as a tensor of this process (once per export). Raises OSError /
        ValueError for a pool this sender must not open (never creating or resizing one)."""

    async def connect(self, dest: KVDest, like: torch.Tensor) -> None:
        check_pool_layout(like, self.pool(dest.address, dest.pool))

    def pool(self, address: str, export: PoolExport) -> torch.Tensor:
        cached = self._pools.get(address)
        if cached is not None and cached[0] == export.pool_id:
            return cached[1]
        self.drop(address)  # a new pool at that address: the old server is gone
        t = self.open_pool(export)
        if tuple(t.shape) != export.shape:
            raise HandoffFailed(f"opened pool {tuple(t.shape)} is not the exported {export.shape}")
        self._pools[address] = (export.pool_id, t)
        self._watchers[address] = asyncio.get_running_loop().create_task(self._watch(address))
        log.info("event=kv_pool_opened address=%s transport=%s", address, export.transport)
        return t

    async def _watch(self, address: str) -> None:
        """Drop the pool once its server is unreachable: an opened CUDA IPC pool keeps the
        dead server's GPU memory allocated for as long as it stays open. A live server that
        only blinked is opened again on its next handoff."""
        ch = self.channels.channel(address)
        state = ch.get_state(try_to_connect=True)
        while state not in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                            grpc.ChannelConnectivity.SHUTDOWN):  # fmt: skip
            await ch.wait_for_state_change(state)
            # IDLE (the server closed the connection): reconnect, to tell live from gone
            state = ch.get_state(try_to_connect=True)
        self._watchers.pop(address, None)  # ending by itself: drop() must not cancel it
        self.drop(address)

    def drop(self, address: str) -> None:
        watcher = self._watchers.pop(address, None)
        if watcher is not None:
            watcher.cancel()
        if self._pools.pop(address, None) is not None:
            log.info("event=kv_pool_dropped address=%s", address)

    @property
    def num_open_pools(self) -> int:
        return len(self._pools)

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    async def send(
        self, dest: KVDest, source: KVSource, first_token_id: int, first_logprob: Logprob | None
    ) -> None:
        src, src_block_ids = source.cache, source.block_ids
        dst_block_ids = list(dest.block_ids[dest.first_block :])
        if len(dst_block_ids) != len(src_block_ids):
            raise HandoffFailed(f"{len(src_block_ids)} blocks for {len(dst_block_ids)} targets")
        if dest.pool is None:
            raise HandoffFailed(f"the decode server exports no {self.name} pool")
        try:
            dst = self.pool(dest.address, dest.pool)
        except (OSError, RuntimeError, ValueError) as e:
            raise HandoffFailed(f"cannot open the decode server's {self.name} pool: {e}") from e
        check_pool_layout(src, dst)
        if dst_block_ids and not 0 <= min(dst_block_ids) <= max(dst_block_ids) < dst.shape[2]:
            raise HandoffFailed("target block ids are outside the decode pool")
        slabs = plan_layer_slabs(
            src, len(src_block_ids), slab_bytes_for(dst.device, self.slab_bytes)
        )
        loop = asyncio.get_running_loop()
        try:
            async with TransferCall(self.channels, dest) as call:
                granted = list(await call.begin(self.name, len(slabs), dest.pool.pool_id))
                if granted != dst_block_ids:  # a forged or stale KVTarget: write nothing
                    raise HandoffRefused(
                        f"the decode server granted blocks {granted}, the KVTarget names"
                        f" {dst_block_ids}: nothing written"
                    )
                # only the granted blocks, the receiver's own record of the handoff's
                writer = SlabWriter(src, dst, src_block_ids, granted, self._stream(dst.device))
                for i, layers in enumerate(slabs):
                    if call.stopped:
                        break  # write nothing more
                    await _run_to_end(loop.run_in_executor(None, writer.write, layers))
                    await call.send(worker_pb2.KVTransferMessage(written_slab=i))
                # done unless stopped; our stream ends: no write of ours is in flight any more
                await call.finish(first_token_id, first_logprob)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.drop(dest.address)  # the server is gone: let its pool go
            raise

    async def close(self) -> None:
        for address in list(self._pools):
            self.drop(address)


# -- receiver ---------------------------------------------------------------------------------
class DirectReceiver(KVReceiver):
    """Decode side: the sender writes the blocks; each message says one more slab is written."""

    progress = "written_slab"
    sender_writes = True

    def check_begin(self, begin: worker_pb2.KVBegin) -> None:
        export = self.kv.export
        if export is None or export.transport != self.name:
            raise HandoffFailed(f"transport {begin.transport!r} is not offered here")
        if begin.pool_id != export.pool_id:
            raise HandoffFailed("the sender opened another pool (a previous server's)")

    async def receive(self, grant: Grant, slab: int, written_slab: int) -> None:
        if written_slab != slab:
            raise HandoffFailed(f"expected slab {slab} written, got {written_slab}")
