"""Paged decode attention in Triton (split-KV, "flash decoding"), GQA-aware.

Grid (batch, kv_head, split). A program owns the GROUP query heads that share one KV head, so
each K/V tile is read from memory once for all of them, and a contiguous range of the context
(one split). Splits let a short batch still fill the GPU on long contexts:

    context of seq b:  [ split 0 | split 1 | split 2 | ... ]     split_len tokens each
                         tile tile  tile ..                      BLOCK_N tokens per tile
    token t  ->  k_cache[block_tables[b, t // block_size], t % block_size, kv_head, :]

Each split writes its normalised partial output and log2-sum-exp; a second kernel, grid
(batch, q_head), merges the splits that hold tokens. With one split the first kernel writes the
output directly and no reduction runs.

CUDA-graph safety: the grid depends only on tensor shapes (the split count comes from
block_tables.shape[1], the widest context the batch can hold), and programs whose split lies
past seq_len (or before the sliding window) exit at once; nothing reads tensors on the host.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from tandem_kernels.triton_common import dot, dot_args

_LOG2E = 1.4426950408889634
# Splits per call aim at this many programs per SM. Tuned on an H100 (bench --sweep): 2 with
# (BLOCK_N 64, 4 warps, 4 stages) was best or within noise of best at every batch/context.
PROGRAMS_PER_SM = 2
_BLOCK_N = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    stride_q_b, stride_q_h,
    stride_kc_b, stride_kc_s, stride_kc_h,
    stride_vc_b, stride_vc_s, stride_vc_h,
    stride_bt_b, stride_o_b, stride_o_h,
    num_q_heads, num_splits, split_len, qk_scale, window,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    if HAS_WINDOW:
        lo = tl.maximum(lo, seq_len - window)
    if not DIRECT:
        if lo >= hi:
            return  # the reduction skips this split too

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    d = tl.arange(0, DIM_PAD)
    hd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q_ptrs = q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + d[None, :]
    q = tl.load(q_ptrs, mask=hd_mask, other=0.0)

    # finite start for the running max: a tile where a row sees no key then gives exp2(-inf) = 0
    # weights and a rescale of exactly 1, instead of the NaN of (-inf) - (-inf)
    m_i = tl.full([GROUP_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    bt_row = bt_ptr + b * stride_bt_b
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_mask = t < hi
        blk = tl.load(bt_row + t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        off = t % BLOCK_SIZE
        kv_mask = t_mask[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(
            kc_ptr + blk[:, None] * stride_kc_b + off[:, None] * stride_kc_s
            + kvh * stride_kc_h + d[None, :],
            mask=kv_mask, other=0.0,
        )  # fmt: skip
        # raw scores; the softmax scale is folded into the exponent (one FMA per score)
        s = dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            vc_ptr + blk[:, None] * stride_vc_b + off[:, None] * stride_vc_s
            + kvh * stride_vc_h + d[None, :],
            mask=kv_mask, other=0.0,
        )  # fmt: skip
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    # l_i == 0 only for an empty context (seq_len 0: a padded slot); write zeros there.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if DIRECT:
        o_ptrs = out_ptr + b * stride_o_b + heads[:, None] * stride_o_h + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        # partials are [B, Hq, num_splits, DIM_PAD] and [B, Hq, num_splits], contiguous
        row = (b * num_q_heads + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * DIM_PAD + d[None, :], out, mask=hd_mask)
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
    stride_o_b, stride_o_h, num_q_heads, num_splits, split_len, window,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, CHUNK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    # the same splits the first kernel ran: those overlapping [window start, seq_len)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(seq_len - window, 0) // split_len
    last = tl.minimum((seq_len + split_len - 1) // split_len, num_splits)
    d = tl.arange(0, DIM_PAD)
    base = (b * num_q_heads + h) * num_splits
    m_run = tl.full([1], -1.0e30, tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([DIM_PAD], tl.float32)
    for s0 in range(first, last, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        s_mask = s < last
        lse = tl.load(part_lse_ptr + base + s, mask=s_mask, other=float("-inf"))
        o = tl.load(
            part_out_ptr + (base + s)[:, None] * DIM_PAD + d[None, :],
            mask=s_mask[:, None], other=0.0,
        )  # fmt: skip
        m_new = tl.maximum(m_run, tl.max(lse, axis=0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(lse - m_new)
        l_run = l_run * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)  # fmt: skip


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: a few splits, so tests exercise the reduction
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_len(
    batch: int, num_kv_heads: int, max_ctx: int, device: torch.device, block_n: int = _BLOCK_N
) -> int:
    """Tokens per split, a multiple of the tile, from shapes only (graph-safe)."""
    want = math.ceil(PROGRAMS_PER_SM * _num_sms(device) / max(batch * num_kv_heads, 1))
    splits = max(1, min(want, math.ceil(max_ctx / block_n)))
    return math.ceil(math.ceil(max_ctx / splits) / block_n) * block_n


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    split_len: int | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Same contract as paged_decode_attention_ref. For tests and tuning: split_len (tokens per
    split, a multiple of the tile) overrides the shape-based choice, config overrides
    (BLOCK_N, num_warps, num_stages)."""
    batch, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    assert num_q_heads % num_kv_heads == 0, "GQA needs Hq to be a multiple of Hkv"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    max_ctx = block_tables.shape[1] * block_size
    # fp32 K/V tiles are twice as large: two stages fit in shared memory, four do not
    block_n, num_warps, num_stages = config or (_BLOCK_N, 4, 4 if q.element_size() <= 2 else 2)
    if split_len is None:
        split_len = choose_split_len(batch, num_kv_heads, max_ctx, q.device, block_n)
    assert split_len % block_n == 0
    num_splits = max(1, math.ceil(max_ctx / split_len))
    direct = num_splits == 1
    dim_pad = triton.next_power_of_2(head_dim)
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(
            (batch, num_q_heads, num_splits, dim_pad), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device
        )
    has_window = sliding_window is not None
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_q_heads, num_splits, split_len, scale * _LOG2E,
        sliding_window if has_window else 0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HAS_WINDOW=has_window, DIRECT=direct, **dot_args(q.dtype, q.device),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not direct:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, seq_lens, out,
            out.stride(0), out.stride(1), num_q_heads, num_splits, split_len,
            sliding_window if has_window else 0,
            HEAD_DIM=head_dim, DIM_PAD=dim_pad, CHUNK=16, HAS_WINDOW=has_window,
            num_warps=4,
        )  # fmt: skip
    return out
