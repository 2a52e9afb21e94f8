"""Copy whole KV blocks between two paged pools in Triton, without a temporary.

A (layer, k|v) pair and a block form one contiguous run of block_size * heads * head_dim
elements in both pools, so the pools are viewed as [layer * 2, block, elements] and a program
copies CHUNK elements of one run:

    grid (pair - pair_start, i, chunk):  dst[pair, dst_ids[i], chunk] = src[pair, src_ids[i], chunk]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, pair_start,
    stride_src_pair, stride_src_block, stride_dst_pair, stride_dst_block,
    NUM_ELEMENTS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    pair = (pair_start + tl.program_id(0)).to(tl.int64)
    i = tl.program_id(1)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    src = src_ptr + pair * stride_src_pair + s * stride_src_block
    dst = dst_ptr + pair * stride_dst_pair + d * stride_dst_block
    if NUM_ELEMENTS % CHUNK == 0:
        tl.store(dst + offs, tl.load(src + offs))
    else:
        mask = offs < NUM_ELEMENTS
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_kv_blocks_triton(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor,
    dst_ids: torch.Tensor,
    layer_start: int,
    layer_end: int,
) -> None:
    """Same contract as copy_kv_blocks_ref (both pools on the same device)."""
    assert src.dtype == dst.dtype and src.shape[:2] == dst.shape[:2]
    assert src.shape[3:] == dst.shape[3:]
    for pool in (src, dst):  # (layer, k|v) merge into one index; a block's run is dense
        assert pool.stride(0) == pool.shape[1] * pool.stride(1) and pool[0, 0, 0].is_contiguous()
    n = src_ids.numel()
    assert n <= 65535, "one program row per block: at most 65535 blocks per call"
    if n == 0 or layer_end <= layer_start:
        return
    num_elements = src[0, 0, 0].numel()
    chunk = min(4096, triton.next_power_of_2(num_elements))
    two = src.shape[1]
    grid = ((layer_end - layer_start) * two, n, triton.cdiv(num_elements, chunk))
    _copy_blocks_kernel[grid](
        src, dst, src_ids, dst_ids, layer_start * two,
        src.stride(1), src.stride(2), dst.stride(1), dst.stride(2),
        NUM_ELEMENTS=num_elements, CHUNK=chunk, num_warps=4,
    )  # fmt: skip
