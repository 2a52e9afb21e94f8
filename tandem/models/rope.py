"""The cos|sin table the rotary kernel reads, with frequency scaling folded in."""

from __future__ import annotations

import math

import torch


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def build_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: dict, device: torch.device
) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos in the first half of the columns, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope scaling {kind!r} is not supported yet")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq).float()
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
