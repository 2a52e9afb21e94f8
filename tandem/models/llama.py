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

import contextlib

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

    def project(self, x, positions, meta: AttentionMetadata, kv_cache, cos_sin_cache):
        """QKV projection, rotary, and the new tokens' K/V written to the cache."""
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
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.o_proj(out.view(out.shape[0], self.q_size)))

    def attend(self, q, k, v, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        """Attention over the paged cache: [T, heads, head_dim]."""
        k_cache, v_cache = kv_cache
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
        return out


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
        q, k, v, residual = self.pre_attention(
            x, residual, positions, meta, kv_cache, cos_sin_cache
        )
        return self.post_attention(self.self_attn.attend(q, k, v, meta, kv_cache), residual)

    def pre_attention(self, x, residual, positions, meta, kv_cache, cos_sin_cache):
        """Input norm, QKV, rotary, KV write: the layer's work before attention reads the cache."""
        h, residual = self.input_layernorm(x, residual)
        if residual is None:
            residual = x
        q, k, v = self.self_attn.project(h, positions, meta, kv_cache, cos_sin_cache)
        return q, k, v, residual

    def post_attention(self, attn_out, residual):
        """o_proj, post-attention norm, MLP: the layer's GEMMs after attention."""
        h, residual = self.post_attention_layernorm(self.self_attn.output(attn_out), residual)
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

    def forward_halves(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        split: int,
        side: torch.cuda.Stream | None,
    ) -> torch.Tensor:
        """forward() of a decode-only batch as two independent halves (rows [:split] and
        [split:]), the second on the `side` stream, so one half's attention (reading KV:
        bandwidth-bound) runs while the other half's GEMMs (compute-bound at large batches)
        do. The two halves' attention kernels take turns, which keeps them out of phase:
        half 1's waits for half 0's of the same layer, half 0's for half 1's of the layer
        before. side=None runs both halves in order on the current stream (CPU, checks)."""
        if not meta.decode_only or self.tp.size > 1:  # one stream per rank's collectives
            raise ValueError("forward_halves takes a decode-only batch at tensor-parallel 1")
        n = input_ids.shape[0]
        rows = (slice(0, split), slice(split, n))
        metas = [
            AttentionMetadata(
                slot_mapping=meta.slot_mapping[r],
                block_tables=meta.block_tables[r],
                seq_lens=meta.seq_lens[r],
                query_start_loc=meta.query_start_loc[: r.stop - r.start + 1],
                max_query_len=1,
                decode_only=True,
            )
            for r in rows
        ]
        main = torch.cuda.current_stream() if side is not None else None
        lanes = (main, side)

        def on(i: int):  # the stream half i runs on (nothing to switch without CUDA)
            return torch.cuda.stream(lanes[i]) if side is not None else contextlib.nullcontext()

        if side is not None:
            side.wait_stream(main)  # the inputs were written on the main stream
        x, residual = [None, None], [None, None]
        for i in (0, 1):
            with on(i):
                x[i] = self.model.embed_tokens(input_ids[rows[i]])
        cos_sin, previous = self.cos_sin_cache, None  # half 1's attention event, last layer
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            attended = None
            for i in (0, 1):
                with on(i):
                    q, k, v, residual[i] = layer.pre_attention(
                        x[i], residual[i], positions[rows[i]], metas[i], kv_cache, cos_sin
                    )
                    turn = attended if i == 1 else previous
                    if turn is not None:
                        lanes[i].wait_event(turn)
                    out = layer.self_attn.attend(q, k, v, metas[i], kv_cache)
                    if side is not None:
                        event = torch.cuda.Event()
                        event.record(lanes[i])
                        attended, previous = (event, previous) if i == 0 else (attended, event)
                    x[i], residual[i] = layer.post_attention(out, residual[i])
        hidden = [None, None]
        for i in (0, 1):
            with on(i):
                hidden[i] = self.model.norm(x[i], residual[i])[0]
        if side is not None:
            main.wait_stream(side)
            hidden[1].record_stream(main)
        return torch.cat(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits [rows, vocab] on rank 0; None on the other ranks (each sends its slice)."""
        logits = self.tp.gather(self.lm_head(hidden).float())
        if logits is not None and logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[:, : self.cfg.vocab_size]
        return logits
