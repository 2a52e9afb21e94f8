"""Which slice of each checkpoint tensor a rank holds, and the full checkpoint layout.

Column-parallel (output rows split, each rank whole heads / matching gate-up columns):
q/k/v_proj, gate/up_proj, lm_head. Row-parallel (input columns split, partial sums all-reduced):
o_proj, down_proj. Everything else (norms, the embedding) is replicated.

    q_proj [num_heads*hd, H]     rank r: rows [r*num_heads/tp*hd, (r+1)*num_heads/tp*hd)
    o_proj [H, num_heads*hd]     rank r: the same range of columns
    lm_head [V, H]               rank r: rows [r*ceil(V/tp), ...) (the last rank zero-padded)
"""

from __future__ import annotations

from typing import NamedTuple

from tandem.config import ModelConfig

# HF name fragment -> the dim split across ranks
SPLIT_DIM = {
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "gate_proj": 0,
    "up_proj": 0,
    "o_proj": 1,
    "down_proj": 1,
    "lm_head": 0,
}


class Shard(NamedTuple):
    dim: int | None  # None: replicated (the whole tensor)
    start: int
    length: int  # may be shorter than per_rank(...) on the last rank of an uneven split


def per_rank(full: int, tp: int) -> int:
    return -(-full // tp)


def shard_of(hf_name: str, shape: tuple[int, ...], rank: int, tp: int) -> Shard:
    part = next((p for p in SPLIT_DIM if f"{p}." in hf_name or hf_name.startswith(p)), None)
    if tp == 1 or part is None:
        return Shard(None, 0, shape[0] if shape else 0)
    dim = SPLIT_DIM[part]
    if dim >= len(shape):  # a bias of a row-parallel layer would be replicated (none here)
        return Shard(None, 0, shape[0])
    n = per_rank(shape[dim], tp)
    start = min(rank * n, shape[dim])
    return Shard(dim, start, min(n, shape[dim] - start))


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) HF checkpoint of a Llama-family model: name -> shape."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
