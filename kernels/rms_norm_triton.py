"""RMSNorm (+ fused residual add) in Triton: one program per row, the whole row in registers.

Rounding follows rms_norm_ref step by step so bf16 results match it bit for bit up to the
order of the fp32 sum of squares:

    s   = round_to(sum_dtype, x + residual)        (also written out as the next residual)
    n   = round_to(sum_dtype, s * rsqrt(mean(s^2) + eps))
    out = round_to(out_dtype, weight * n)          (out_dtype = promote(weight, sum_dtype))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem_kernels.triton_common import tl_dtype


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    SUM_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(SUM_DTYPE)
        tl.store(res_out_ptr + row * stride_res_out + cols, s, mask=mask)
        x = s.to(tl.float32)
    else:
        x = x.to(SUM_DTYPE).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    n = (x * inv).to(SUM_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * n).to(OUT_DTYPE), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(weight.dtype, sum_dtype)
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    out2 = out.view(-1, hidden)
    res_out = None
    res2 = res_out2 = x2  # placeholders; never read when HAS_RESIDUAL is False
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
        res_out2 = res_out.view(-1, hidden)
    num_rows = x2.shape[0]
    if num_rows == 0:
        return out, res_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x2,
        res2,
        weight.contiguous(),
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        SUM_DTYPE=tl_dtype(sum_dtype),
        OUT_DTYPE=tl_dtype(out_dtype),
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, res_out
