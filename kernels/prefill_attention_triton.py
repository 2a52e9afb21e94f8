"""Prefill/extend attention over the paged KV cache in Triton (flash-attention style).

Grid (q_head, m_block, seq). A program takes BLOCK_M consecutive new tokens of one sequence and
one query head, and streams that sequence's keys through an online softmax. For sequence b:

    prefix = seq_len - q_len                          (tokens already cached before this chunk)
    row i of the chunk sits at position prefix + i and sees keys [0, prefix + i]

    keys:  0 ................................ prefix+m0 ....... prefix+m0+BLOCK_M
           |  full tiles: every row sees them   | diagonal tiles: causal mask |
           ^ (sliding window: start at the first key the tile's first row sees)

The full tiles run without a mask; only the diagonal ones pay for it. Keys are gathered
through the block table token by token, so any power-of-two block size works:

    key t  ->  k_cache[block_tables[b, t // block_size], t % block_size, q_head // GROUP, :]

m blocks are launched last-first: the longest rows (most keys) start earliest, which evens the
tail of the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import dot, dot_args

_LOG2E = 1.4426950408889634


@triton.jit
def _block_ids(bt_row, t, seq_len, MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    if MASKED:
        return tl.load(bt_row + t // BLOCK_SIZE, mask=t < seq_len, other=0).to(tl.int64)
    else:
        return tl.load(bt_row + t // BLOCK_SIZE).to(tl.int64)


@triton.jit
def _attend_tiles(
    q, m_i, l_i, acc, kc_base, vc_base, bt_row, stride_kc_b, stride_kc_s,
    stride_vc_b, stride_vc_s, lo, hi, seq_len, q_pos, qk_scale, window,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, DIM_PAD)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        off = t % BLOCK_SIZE
        # (loading the next tile's block ids one iteration early measured no faster on an
        # H100: the software pipeliner already hides this load)
        blk = _block_ids(bt_row, t, seq_len, MASKED, BLOCK_SIZE)
        k_ptrs = kc_base + blk[:, None] * stride_kc_b + off[:, None] * stride_kc_s + d[None, :]
        v_ptrs = vc_base + blk[:, None] * stride_vc_b + off[:, None] * stride_vc_s + d[None, :]
        # full tiles of a power-of-two head_dim load unmasked (wider, simpler loads)
        if MASKED:
            kv_mask = (t[:, None] < seq_len) & (d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif DIM_PAD != HEAD_DIM:
            kv_mask = (d[None, :] < HEAD_DIM) & (t[:, None] >= 0)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        # raw scores; the softmax scale is folded into the exponent below (one FMA per score)
        s = dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)
        if MASKED:
            ok = (t[None, :] <= q_pos[:, None]) & (t[None, :] < seq_len)
            if HAS_WINDOW:
                ok = ok & (t[None, :] > q_pos[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED or DIM_PAD != HEAD_DIM:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    stride_q_t, stride_q_h,
    stride_kc_b, stride_kc_s, stride_kc_h,
    stride_vc_b, stride_vc_s, stride_vc_h,
    stride_bt_b, stride_o_t, stride_o_h,
    qk_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len
    kvh = h // GROUP

    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_PAD)
    qd_mask = (rows[:, None] < q_len) & (d[None, :] < HEAD_DIM)
    q_ptrs = q_ptr + (q_start + rows)[:, None] * stride_q_t + h * stride_q_h + d[None, :]
    q = tl.load(q_ptrs, mask=qd_mask, other=0.0)
    q_pos = prefix + rows

    # finite start: a row that sees no key in a tile rescales by 1 instead of making NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    bt_row = bt_ptr + b * stride_bt_b
    kc_base = kc_ptr + kvh * stride_kc_h
    vc_base = vc_ptr + kvh * stride_vc_h
    hi = tl.minimum(seq_len, prefix + m0 + BLOCK_M)
    # tiles ending at or before the first row's position are visible to every row
    full_hi = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        lo = tl.maximum(prefix + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        m_i, l_i, acc = _attend_tiles(
            q, m_i, l_i, acc, kc_base, vc_base, bt_row, stride_kc_b, stride_kc_s,
            stride_vc_b, stride_vc_s, lo, hi, seq_len, q_pos, qk_scale, window,
            HEAD_DIM, DIM_PAD, BLOCK_N, BLOCK_SIZE, True, True, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    else:
        m_i, l_i, acc = _attend_tiles(
            q, m_i, l_i, acc, kc_base, vc_base, bt_row, stride_kc_b, stride_kc_s,
            stride_vc_b, stride_vc_s, 0, full_hi, seq_len, q_pos, qk_scale, window,
            HEAD_DIM, DIM_PAD, BLOCK_N, BLOCK_SIZE, False, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
        m_i, l_i, acc = _attend_tiles(
            q, m_i, l_i, acc, kc_base, vc_base, bt_row, stride_kc_b, stride_kc_s,
            stride_vc_b, stride_vc_s, full_hi, hi, seq_len, q_pos, qk_scale, window,
            HEAD_DIM, DIM_PAD, BLOCK_N, BLOCK_SIZE, True, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + (q_start + rows)[:, None] * stride_o_t + h * stride_o_h + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=qd_mask)


def _tile_config(
    head_dim: int, device: torch.device, itemsize: int = 2
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Tuned on an H100 by bench/kernels_bench.py
    for 2-byte dtypes; fp32 tiles are smaller so the pipeline stages fit in shared memory."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # the interpreter: small tiles keep the CPU tests quick
    if itemsize > 2:
        return (64, 32, 4, 2) if head_dim <= 128 else (32, 32, 4, 1)
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Same contract as paged_prefill_attention_ref. max_query_len sizes the grid (pass it to
    avoid a device->host sync); config overrides the tile choice (for tuning)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_q_heads % num_kv_heads == 0, "GQA needs Hq to be a multiple of Hkv"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = query_start_loc.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return out
    block_m, block_n, num_warps, num_stages = config or _tile_config(
        head_dim, q.device, q.element_size()
    )
    has_window = sliding_window is not None
    grid = (num_q_heads, triton.cdiv(max_query_len, block_m), batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * _LOG2E, sliding_window if has_window else 0,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HAS_WINDOW=has_window,
        **dot_args(q.dtype, q.device),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
