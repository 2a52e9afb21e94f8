"""Copy whole KV blocks between two paged pools (a KV handoff on one host): for every layer in
[layer_start, layer_end), K and V of src block src_ids[i] land in dst block dst_ids[i].

    pool: [layer, k|v, block, slot in block, kv head, head dim]   (pools may differ in blocks)
    dst[l, :, dst_ids[i]] = src[l, :, src_ids[i]]
"""

from __future__ import annotations

import torch


def copy_kv_blocks_ref(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    layer_start: int,
    layer_end: int,
) -> None:
    """src_ids/dst_ids: int64 block ids on src's/dst's device. Gathers into a temporary of the
    copied size, then scatters (twice the traffic of a direct copy)."""
    gathered = src[layer_start:layer_end].index_select(2, src_ids)
    dst[layer_start:layer_end].index_copy_(2, dst_ids, gathered.to(dst.device))
