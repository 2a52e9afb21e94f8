"""The KV handoff interface: one sender and one receiver shape for every transport.

Ownership: the decode side owns the reserved blocks for the whole life of a handoff. A sender
only writes into them while its receiver has granted it; it never frees them. The receiver's
ledger frees (or commits) them exactly once, whatever order completion, abort and lease expiry
come in, and only once no write can land in them any more (`HandoffLedger.settle`).
The prefill side owns its own blocks: a transport that reads them in place (`holds_blocks`)
keeps them held by the engine request until its push ended, then the caller releases them.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol

import torch

from kvtransfer.pool import PoolExport
from tandem.records import Logprob

if TYPE_CHECKING:
    from kvtransfer.channel import Channels
    from protos import worker_pb2


class HandoffState(enum.Enum):
    RESERVED = "reserved"  # blocks reserved, no KV yet
    RECEIVING = "receiving"  # a transfer is under way (granted, slabs arriving)
    COMPLETE = "complete"  # every slab and the first token arrived
    FAILED = "failed"  # the sender gave up or sent garbage
    RECLAIMED = "reclaimed"  # aborted or lease expired: blocks taken back

    @property
    def terminal(self) -> bool:
        return self in (HandoffState.COMPLETE, HandoffState.FAILED, HandoffState.RECLAIMED)


class HandoffFailed(RuntimeError):
    pass


class HandoffRefused(HandoffFailed):
    """The receiver answered and said no (its handoff had already ended, bad chunk, ...)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a sender runs: what decides which decode pools it can reach."""

    host_id: str  # kvtransfer.pool.host_id(): kernel boot id + IPC namespace
    gpu_uuid: str  # "" when its KV cache is on the CPU


@dataclass(frozen=True)
class KVDest:
    """Where one handoff's KV goes: the decode server's KVTarget (kvtransfer/wire.py)."""

    handoff_id: str
    address: str  # host:port of the decode server's KVTransfer service
    block_ids: tuple[int, ...]  # decode-side blocks for the whole prompt
    first_block: int  # blocks before this one are already cached on the decode side
    req_id: str = ""  # the worker request the KV belongs to (logs)
    transports: tuple[str, ...] = ("grpc",)  # what the receiver accepts, best first
    pool: PoolExport | None = None  # the receiver's exported pool (same-host transports)
    capability: bytes = b""  # KVTarget.capability: what lets this sender write the handoff


@dataclass(frozen=True)
class Grant:
    """What an authenticated Transfer call may write: block_ids[first_block:] of its handoff,
    from the receiver's own ledger. The blocks before first_block hold the decode server's
    prefix cache, shared with other requests: no sender ever writes them."""

    block_ids: tuple[int, ...]  # the handoff's blocks for the whole prompt (KVTarget order)
    first_block: int  # num_cached_tokens // block_size

    @property
    def writable(self) -> tuple[int, ...]:
        return self.block_ids[self.first_block :]


class KVSource(NamedTuple):
    """Where one request's KV is on the sender: blocks `block_ids` of `cache`, in prompt
    order from KVDest.first_block on, every KV head. Either the engine's own pool (blocks held
    by the request until the push ends) or a copy (blocks 0..n-1; the engine's went back)."""

    cache: torch.Tensor  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
    block_ids: list[int]
    release: Callable[[], Awaitable[None]]  # gives held blocks back; a no-op for a copy


class EngineKV(Protocol):
    """The engine calls a sender reads a request's KV through (tandem.async_engine)."""

    async def held_block_ids(self, req_id: str, first_block: int = 0) -> list[int] | None: ...

    async def copy_kv_and_release(
        self, req_id: str, first_block: int = 0
    ) -> torch.Tensor | None: ...

    async def release(self, req_id: str) -> None: ...


async def _nothing() -> None:
    return None


class KVSender(abc.ABC):
    """Prefill side of one transport; one instance per prefill server, shared by its handoffs.

    `name` is the registry key and the KVTarget.transports entry. `holds_blocks` says how the
    transport reads the KV: True, straight from the engine's blocks, which stay held until the
    push ended (no copy); False, from a copy taken at once, the blocks released before the
    push (the copy also gathers the KV heads of every tensor-parallel rank).
    """

    name: ClassVar[str]
    holds_blocks: ClassVar[bool]

    def __init__(self, channels: Channels, here: Endpoint) -> None:
        self.channels = channels  # gRPC channels to decode servers (control plane, grpc data)
        self.here = here

    @classmethod
    def unreachable(cls, here: Endpoint, pool: PoolExport | None) -> str:
        """Why a sender at `here` cannot reach a receiver exporting `pool` ("" when it can)."""
        return ""

    async def connect(self, dest: KVDest, like: torch.Tensor) -> None:
        """Ready dest for handoffs of KV laid out like `like` (this server's cache), e.g. open
        its pool once. Raises OSError / RuntimeError / ValueError when this transport cannot
        reach it after all (auto mode then falls back to grpc)."""
        return None

    async def read(
        self, engine: EngineKV, cache: torch.Tensor, req_id: str, first_block: int
    ) -> KVSource | None:
        """The request's KV from first_block as this transport reads it (`cache`: the engine's
        pool); None when the request is gone (aborted after its last step)."""
        if self.holds_blocks:
            ids = await engine.held_block_ids(req_id, first_block)
            if ids is None:
                return None
            return KVSource(cache, ids, lambda: engine.release(req_id))
        kv = await engine.copy_kv_and_release(req_id, first_block)
        return None if kv is None else KVSource(kv, list(range(kv.shape[2])), _nothing)

    @abc.abstractmethod
    async def send(
        self, dest: KVDest, source: KVSource, first_token_id: int, first_logprob: Logprob | None
    ) -> None:
        """Move source's blocks into dest.block_ids[dest.first_block:]; returns once the
        receiver completed the handoff. Raises HandoffRefused when it said no. A cancel
        ends the call, which the receiver sees at once; no write of ours lands after it."""

    async def close(self) -> None:
        """Let go of what connect opened."""
        return None


# Tensor parallel decode side: (block ids, layer_start, layer_end, all-heads KV) -> stored in
# every rank's pool, run on the engine thread (AsyncEngine.write_kv)
KVWrite = Callable[[list[int], int, int, torch.Tensor], Awaitable[None]]


@dataclass(frozen=True)
class DecodeKV:
    """The decode server's side of every handoff: where received KV lands."""

    kv_cache: torch.Tensor  # this rank's pool [layers, 2, num_blocks, block_size, heads, dim]
    kv_shape: tuple[int, ...]  # the pool's shape with every KV head (what slabs carry)
    write: KVWrite | None = None  # tensor-parallel size > 1: store through the engine
    export: PoolExport | None = None  # the pool as shared with same-host senders


class KVReceiver(abc.ABC):
    """Decode side of one transport: its part of receiving a handoff (the rest, ledger and
    protocol, is kvtransfer/receiver.py's, the same for every transport).

    `progress` names the KVTransferMessage field that carries one slab; `sender_writes` says
    whether the sender writes the reserved blocks itself (same host): then a write may be in
    flight from the grant until the sender's stream ended, and the blocks are freed only after.
    """

    name: ClassVar[str]
    progress: ClassVar[str]
    sender_writes: ClassVar[bool]

    def __init__(self, kv: DecodeKV) -> None:
        self.kv = kv

    def check_begin(self, begin: worker_pb2.KVBegin) -> None:
        """Raise HandoffFailed when begin does not fit this receiver."""
        return None

    @abc.abstractmethod
    async def receive(self, grant: Grant, slab: int, msg) -> None:
        """Slab number `slab` of the handoff, within grant.writable: store it (grpc) or check
        the sender's progress (same host). Raises HandoffFailed."""
