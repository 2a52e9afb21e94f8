"""Llama family (Llama 2/3/3.1, Mistral, SmolLM): plain PyTorch layers that call kernels.

The layer names mirror HF's checkpoint names except the fused projections (qkv_proj,
gate_up_proj), which the loader fills from the separate HF tensors (see STACKED_PARAMS).

Tensor parallelism (tp ranks, tandem/tp/sharding.py): qkv_proj and gate_up_proj hold this
rank's heads / intermediate columns, o_proj and down_proj the matching input columns and their
outputs are summed over ranks (one all-reduce each per layer); lm_head holds a slice of the
vocabulary and the logits are gathered on rank 0. The embedding is replicated: a vocab-parallel
one would cost a third all-reduce per step to save ~1 GB per rank at 8B size, and replicated
rows keep TP=N embeddings bit-identical to TP=1.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.models.attention_metadata import AttentionMetadata
from tandem.models.rope import build_cos_sin_cache
from tandem.tp.group import TPGroup
from tandem.tp.sharding import per_rank
from tandem_kernels.registry import KernelOps

# fused parameter -> [(HF name fragment, shard id)], shard ids in concatenation order
STACKED_PARAMS = {
    "qkv_proj": [("q_proj", 0), ("k_proj", 1), ("v_proj", 2)],
    "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer_idx: int, tp: TPGroup) -> None:
        super().__init__()
        self.ops = ops
        self.tp = tp
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads // tp.size,  # this rank's heads
            cfg.num_kv_heads // tp.size,
            cfg.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)[0]
            k = self.k_norm(k)[0]
        q, k = self.ops.rotary(q, k, positions, cos_sin_cache)
        k_cache, v_cache = kv_cache
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_only:
            out = self.ops.decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                self.scale,
                self.sliding_window,
            )
        elif meta.num_decode_rows:  # mixed: decode rows first, then the prefill chunks
            nd = meta.num_decode_rows
            decoded = self.ops.decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                self.scale,
                self.sliding_window,
            )
            prefilled = self.ops.prefill_attention(
                q[nd:],
                k_cache,
                v_cache,
                meta.block_tables[nd:],
                meta.prefill_query_start_loc,
                meta.prefill_seq_lens,
                self.scale,
                self.sliding_window,
                max_query_len=meta.max_query_len,
                k=k[nd:],
                v=v[nd:],
            )
            out = torch.cat([decoded, prefilled])
        else:
            out = self.ops.prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.seq_lens,
                self.scale,
                self.sliding_window,
                max_query_len=meta.max_query_len,  # spares the Triton kernel a host sync
                k=k,  # the chunk's own K/V, read densely instead of back through the cache
                v=v,
            )
        return self.tp.all_reduce(self.o_proj(out.view(num_tokens, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup) -> None:
        super().__init__()
        self.ops = ops
        self.tp = tp
        inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layer_idx: int, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, ops, layer_idx, tp)
        self.mlp = MLP(cfg, ops, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, x, residual, positions, meta, kv_cache, cos_sin_cache):
        h, residual = self.input_layernorm(x, residual)
        if residual is None:
            residual = x
        h = self.self_attn(h, positions, meta, kv_cache, cos_sin_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class LlamaForCausalLM(nn.Module):
    stacked_params = STACKED_PARAMS

    def __init__(
        self, cfg: ModelConfig, ops: KernelOps, max_positions: int, tp: TPGroup | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp = tp or TPGroup()
        self.model = LlamaModel(cfg, ops, tp)
        # this rank's vocabulary rows; the last rank's padding rows stay zero (cut after gather)
        self.lm_head = nn.Linear(cfg.hidden_size, per_rank(cfg.vocab_size, tp.size), bias=False)
        if cfg.tie_word_embeddings and tp.size == 1:
            # at tp > 1 lm_head is a separate slice, filled from the embedding by the loader
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_positions = max_positions
        self.register_buffer("cos_sin_cache", None, persistent=False)

    def init_rope(self, device: torch.device) -> None:
        """The fp32 rotary table, built after any dtype cast of the module (which would round
        it to bf16) on the parameters' device."""
        cfg = self.cfg
        self.cos_sin_cache = build_cos_sin_cache(
            cfg.head_dim, self.max_positions, cfg.rope_theta, dict(cfg.rope_scaling), device
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions [T] (packed batch) -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, meta, kv_cache, self.cos_sin_cache)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits [rows, vocab] on rank 0; None on the other ranks (each sends its slice)."""
        logits = self.tp.gather(self.lm_head(hidden).float())
        if logits is not None and logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[:, : self.cfg.vocab_size]
        return logits
