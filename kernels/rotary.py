"""Rotary position embedding, NeoX layout (rotate halves), the layout HF Llama/Qwen use.

cos_sin_cache is [max_positions, head_dim] fp32: cos in the first head_dim/2 columns and sin in
the last head_dim/2. Llama-3 frequency scaling is folded into the cache when it is built
(tandem.models.rope), so the kernel never sees the scaling scheme.
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T] -> rotated (q, k), new tensors."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
