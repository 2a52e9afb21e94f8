"""Small pieces shared by the Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"triton kernels support fp32/fp16/bf16, not {dtype}") from None


def dot_args(dtype: torch.dtype, device: torch.device) -> dict:
    """Constexprs for `dot`: exact fp32 products for fp32 inputs (not tf32), and the
    interpreter workaround below whenever the tensors are on the CPU (only the interpreter runs
    there)."""
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT_UPCAST=device.type != "cuda",
    )


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # The Triton interpreter (3.9) keeps bf16 as raw uint16 and multiplies the bit patterns in
    # tl.dot; upcasting first is exact, so the CPU tests still check the GPU arithmetic.
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)
