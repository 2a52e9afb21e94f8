"""Filling a model's parameters: from safetensors files, or random ("dummy") on the device."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.tp.sharding import Shard, hf_tensor_shapes, shard_of


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) per tensor: a rank reads only the rows or columns it keeps."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    from tqdm import tqdm

    for path in tqdm(
        files, desc="loading weights", unit="file", disable=len(files) < 2, leave=True
    ):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def read_shard(src: Any, shard: Shard) -> torch.Tensor:
    """The shard of a tensor or of a safetensors slice (which reads only those bytes)."""
    if isinstance(src, torch.Tensor):
        return src if shard.dim is None else src.narrow(shard.dim, shard.start, shard.length)
    if shard.dim is None:
        return src[:]
    index = [slice(None)] * shard.dim + [slice(shard.start, shard.start + shard.length)]
    return src[tuple(index)]


def _shape(src: Any) -> tuple[int, ...]:
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def load_weights(model: nn.Module, weights: Iterator[tuple[str, Any]]) -> None:
    """Copy HF-named tensors (or lazy slices) into the model, this rank's shard of each,
    splicing q/k/v and gate/up into fused params."""
    params = dict(model.named_parameters())
    tp = model.tp
    # tied embeddings at tp > 1: lm_head is its own slice of the embedding (see llama.py)
    tied_slice = model.cfg.tie_word_embeddings and "lm_head.weight" in params
    loaded: set[str] = set()
    for name, src in weights:
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
        shape = _shape(src)
        _copy_into(model, target, read_shard(src, shard_of(name, shape, tp.rank, tp.size)), shard)
        loaded.add(target if shard is None else f"{target}#{shard[1]}")
        if tied_slice and name == "model.embed_tokens.weight":
            head = shard_of("lm_head.weight", shape, tp.rank, tp.size)
            _copy_into(model, "lm_head.weight", read_shard(src, head), None)
            loaded.add("lm_head.weight")
    _check_complete(model, params, loaded)


def _copy_into(model: nn.Module, target: str, tensor: torch.Tensor, shard) -> None:
    data = model.get_parameter(target).data
    if shard is not None:
        data = data.narrow(0, _shard_offset(model, *shard), tensor.shape[0])
    elif target == "lm_head.weight" and tensor.shape[0] < data.shape[0]:
        data[tensor.shape[0] :].zero_()  # last rank: rows past the vocabulary (cut after gather)
        data = data.narrow(0, 0, tensor.shape[0])
    if tensor.shape != data.shape:
        raise ValueError(
            f"checkpoint tensor for {target} has shape {tuple(tensor.shape)}, the model's"
            f" (this rank's shard) is {tuple(data.shape)}"
        )
    data.copy_(tensor)


def _shard_offset(model: nn.Module, fused: str, shard_id: int) -> int:
    """Where a part starts in this rank's fused parameter."""
    cfg, tp = model.cfg, model.tp.size
    if fused == "qkv_proj":
        q, kv = cfg.num_heads // tp * cfg.head_dim, cfg.num_kv_heads // tp * cfg.head_dim
        return (0, q, q + kv)[shard_id]
    return shard_id * (cfg.intermediate_size // tp)


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


def iter_dummy_weights(
    cfg: ModelConfig, seed: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """A random full checkpoint, one HF tensor at a time, drawn on the device (fast for
    8B-class models on a GPU) from a generator seeded by (seed, name): every rank draws the
    same full tensor and keeps its shard, so TP=1 and TP=N build the same model.

    Norm weights stay near 1 and the rest small, so activations stay finite through all layers.
    """
    for name, shape in hf_tensor_shapes(cfg).items():
        gen = torch.Generator(device=device).manual_seed(
            seed * 1_000_003 + zlib.crc32(name.encode())
        )
        t = torch.empty(shape, device=device, dtype=dtype)
        if "norm" in name:
            t.uniform_(0.9, 1.1, generator=gen)
        else:
            t.uniform_(-0.02, 0.02, generator=gen)
        yield name, t
