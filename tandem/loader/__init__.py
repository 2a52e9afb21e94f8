"""Model loading: resolve the model, build the architecture, fill the weights."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.loader.weights import iter_dummy_weights, iter_safetensors, load_weights
from tandem.models import get_model_class
from tandem.tp.group import TPGroup
from tandem_kernels.registry import KernelOps

log = logging.getLogger(__name__)


def read_hf_config(model_dir: Path, overrides: dict | None = None) -> dict:
    hf = json.loads((model_dir / "config.json").read_text())
    hf.update(overrides or {})
    return hf


def load_model(
    model_dir: Path,
    model_cfg: ModelConfig,
    ops: KernelOps,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    load_format: str = "auto",
    seed: int = 0,
    tp: TPGroup | None = None,
) -> nn.Module:
    """This rank's shard of the model (the whole model at tp size 1)."""
    start = time.perf_counter()
    cls = get_model_class(model_cfg.architecture)
    with torch.device(device):
        model = cls(model_cfg, ops, max_positions, tp).to(dtype)
    model.init_rope(device)
    if load_format == "dummy":
        load_weights(model, iter_dummy_weights(model_cfg, seed, device, dtype))
    else:
        load_weights(model, iter_safetensors(model_dir))
    model.eval().requires_grad_(False)
    log.info(
        "event=model_loaded arch=%s format=%s dtype=%s device=%s tp_rank=%d/%d seconds=%.2f",
        model_cfg.architecture,
        load_format,
        dtype,
        device,
        model.tp.rank,
        model.tp.size,
        time.perf_counter() - start,
    )
    return model


__all__ = ["load_model", "read_hf_config"]
