"""Rotary embedding (NeoX rotate-halves) in Triton: one program per token rotates all its q and
k heads, reading that position's cos|sin row once.

    x = [x1 | x2] (halves of head_dim)   ->   [x1*cos - x2*sin | x2*cos + x1*sin]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, stride_src_t, stride_src_h, stride_dst_t, stride_dst_h, t, num_heads,
    cos, sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (cols < HALF)
    src = src_ptr + t * stride_src_t + heads * stride_src_h + cols
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    dst = dst_ptr + t * stride_dst_t + heads * stride_dst_h + cols
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cs_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h,
    stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    QH_PAD: tl.constexpr, KH_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)[None, :]
    cmask = cols < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + cols, mask=cmask, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + cols, mask=cmask, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, stride_q_t, stride_q_h, stride_qo_t, stride_qo_h, t,
                  num_q_heads, cos, sin, HALF, HALF_PAD, QH_PAD)  # fmt: skip
    _rotate_heads(k_ptr, k_out_ptr, stride_k_t, stride_k_h, stride_ko_t, stride_ko_h, t,
                  num_k_heads, cos, sin, HALF, HALF_PAD, KH_PAD)  # fmt: skip


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated (q, k), new tensors."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens, half = q.shape[0], q.shape[-1] // 2
    if num_tokens == 0:
        return q_out, k_out
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, cs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cs.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        QH_PAD=triton.next_power_of_2(q.shape[1]), KH_PAD=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
    )  # fmt: skip
    return q_out, k_out
