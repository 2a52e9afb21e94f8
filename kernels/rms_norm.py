"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out = norm(x + residual) * weight; also returns x + residual (the next residual).

    Accumulates in fp32 like HF's LlamaRMSNorm and casts back to the input dtype before the
    weight multiply, so the result matches HF bit for bit on the same dtype.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual
