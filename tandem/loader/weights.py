"""Filling a model's parameters: from safetensors files, or random ("dummy") on the device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    from tqdm import tqdm

    for path in tqdm(
        files, desc="loading weights", unit="file", disable=len(files) < 2, leave=False
    ):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the model, splicing q/k/v and gate/up into fused params."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        target, shard = name, None
        for fused, parts in model.stacked_params.items():
            for part, shard_id in parts:
                if f".{part}." in name:
                    target, shard = name.replace(part, fused), (fused, shard_id)
                    break
            if shard:
                break
        if target not in params:
            if target == "lm_head.weight" and model.cfg.tie_word_embeddings:
                continue
            raise KeyError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        param = params[target]
        if shard is None:
            param.data.copy_(tensor)
        else:
            param.data.narrow(0, _shard_offset(model, *shard), tensor.shape[0]).copy_(tensor)
        loaded.add(target if shard is None else f"{target}#{shard[1]}")
    _check_complete(model, params, loaded)


def _shard_offset(model: nn.Module, fused: str, shard_id: int) -> int:
    cfg = model.cfg
    if fused == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return (0, q, q + kv)[shard_id]
    return shard_id * cfg.intermediate_size


def _check_complete(model: nn.Module, params: dict, loaded: set[str]) -> None:
    missing = []
    for name in params:
        fused = next((f for f in model.stacked_params if f".{f}." in name), None)
        if fused:
            missing += [
                f"{name}#{i}" for _, i in model.stacked_params[fused] if f"{name}#{i}" not in loaded
            ]
        elif name not in loaded and not (
            name == "lm_head.weight" and model.cfg.tie_word_embeddings
        ):
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights drawn on the parameters' device (fast for 8B-class models on a GPU).

    Norm weights stay near 1 and the rest small, so activations stay finite through all layers.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(0.9, 1.1, generator=gen)
        else:
            p.uniform_(-0.02, 0.02, generator=gen)
