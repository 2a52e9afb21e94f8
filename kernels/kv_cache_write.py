"""Scatter the new tokens' K and V into the paged cache.

    slot = block_id * block_size + offset_in_block
    k_cache.view(num_blocks * block_size, Hkv, D)[slot] = k[t]

A slot of -1 means "do not store" (padding in a captured batch).
"""

from __future__ import annotations

import torch


def write_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; slot_mapping [T]."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, k[keep].to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v[keep].to(v_cache.dtype))
