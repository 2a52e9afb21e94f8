"""torch dtype -> triton dtype, for kernels that round to a dtype chosen on the host."""

from __future__ import annotations

import torch
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
