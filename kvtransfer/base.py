"""The KV handoff interface: who sends what, into which blocks, and the states of a handoff.

Ownership: the decode side owns the reserved blocks for the whole life of a handoff. A sender
only writes into them through a receiver; it never frees them. The receiver's ledger frees (or
commits) them exactly once, whatever order completion, abort and lease expiry come in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from tandem.request import Logprob


class HandoffState(enum.Enum):
    RESERVED = "reserved"  # blocks reserved, no KV yet
    RECEIVING = "receiving"  # some chunks stored
    COMPLETE = "complete"  # every chunk and the first token arrived
    FAILED = "failed"  # the sender gave up or sent garbage
    RECLAIMED = "reclaimed"  # aborted or lease expired: blocks taken back

    @property
    def terminal(self) -> bool:
        return self in (HandoffState.COMPLETE, HandoffState.FAILED, HandoffState.RECLAIMED)


@dataclass(frozen=True)
class KVDest:
    """Where one handoff's KV goes (the decode server's KVTarget, transport-neutral)."""

    handoff_id: str
    address: str  # transport-specific address of the receiver
    block_ids: tuple[int, ...]  # decode-side blocks for the whole prompt
    first_block: int  # blocks before this one are already cached on the decode side
    req_id: str = ""  # the worker request the KV belongs to (logs, fault hooks)


class KVSlice(NamedTuple):
    """A slab of KV: layers [layer_start, layer_end) x handoff blocks [block_offset, +n)."""

    layer_start: int
    layer_end: int
    block_offset: int
    data: torch.Tensor  # [layers, 2, n_blocks, block_size, kv_heads, head_dim]


class KVSender(Protocol):
    """Prefill side. `send` returns once the receiver has stored every slice and the token."""

    async def send(
        self,
        dest: KVDest,
        slices: list[KVSlice],
        first_token_id: int,
        first_logprob: Logprob | None,
    ) -> None: ...

    async def close(self) -> None: ...


def plan_slices(
    kv_cache: torch.Tensor, src_block_ids: list[int], first_block: int, max_bytes: int
) -> list[KVSlice]:
    """Cut the blocks [first_block:] of one request into slices of at most max_bytes each.

    kv_cache is [layers, 2, num_blocks, block_size, kv_heads, head_dim]. A slice covers whole
    blocks across a range of layers; blocks are grouped first, layers split only when a single
    block over all layers is already over the limit.
    """
    num_layers = kv_cache.shape[0]
    per_block_layer = kv_cache[0, :, 0].numel() * kv_cache.element_size()
    layers_per_slice = max(1, min(num_layers, max_bytes // per_block_layer))
    blocks_per_slice = max(1, max_bytes // (per_block_layer * layers_per_slice))
    slices = []
    for b0 in range(first_block, len(src_block_ids), blocks_per_slice):
        ids = src_block_ids[b0 : b0 + blocks_per_slice]
        index = torch.tensor(ids, device=kv_cache.device)
        for l0 in range(0, num_layers, layers_per_slice):
            l1 = min(num_layers, l0 + layers_per_slice)
            slices.append(KVSlice(l0, l1, b0, kv_cache[l0:l1].index_select(2, index)))
    return slices
