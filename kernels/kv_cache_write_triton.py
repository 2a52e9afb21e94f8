"""Scatter new K/V into the paged cache in Triton: one program per token copies all its heads.

slot = block_id * block_size + offset      (-1: padding, skipped)
k_cache[slot // block_size, slot % block_size, h, :] = k[t, h, :]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    num_heads, block_size,
    HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < num_heads) & (cols < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_k_t + heads * stride_k_h + cols, mask=mask)
    v = tl.load(v_ptr + t * stride_v_t + heads * stride_v_h + cols, mask=mask)
    kc = kc_ptr + blk * stride_kc_b + off * stride_kc_s + heads * stride_kc_h + cols
    vc = vc_ptr + blk * stride_vc_b + off * stride_vc_s + heads * stride_vc_h + cols
    tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; slot_mapping [T]."""
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be dense"
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        num_warps=4,
    )  # fmt: skip
