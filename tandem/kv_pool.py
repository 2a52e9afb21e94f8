"""The paged KV pool: its layout, how many blocks memory allows, and the pool itself.

One pool for all layers: [layer, k|v, block, slot in block, kv head, head dim]. At
tensor-parallel size N each rank's pool holds its num_kv_heads / N heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tandem.config import EngineConfig
from tandem.models.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVLayout:
    """One rank's KV pool, but for its block count."""

    num_layers: int
    block_size: int
    num_kv_heads: int  # this rank's
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        return (
            self.num_layers
            * 2
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * self.dtype.itemsize
        )

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (
            self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        )  # fmt: skip


def allocate_kv_pool(
    layout: KVLayout, num_blocks: int, device: torch.device, kv_cache_file: str | None
) -> torch.Tensor:
    shape = layout.shape(num_blocks)
    if kv_cache_file:
        if device.type != "cpu":
            raise ValueError("kv_cache_file (a shared-memory KV pool) is for CPU engines")
        # a new file reads as zeros; pages are only allocated when written
        numel = int(np.prod(shape))
        return torch.from_file(kv_cache_file, shared=True, size=numel, dtype=layout.dtype).view(
            shape
        )
    return torch.zeros(shape, dtype=layout.dtype, device=device)


def blocks_from_memory(
    cfg: EngineConfig, layout: KVLayout, model: nn.Module, device: torch.device
) -> int:
    """KV blocks from this process's share of the GPU: gpu_memory_utilization is the
    fraction of the whole GPU this process may use (weights + activations + KV), as in
    vLLM V1, so a prefill and a decode server can share one GPU with, say, 0.3 and 0.6.
    The free memory caps it, less a margin for the CUDA context and graphs."""
    block_bytes = layout.block_bytes
    if device.type != "cuda":
        return max(16, int(cfg.cpu_kv_cache_gib * 2**30) // block_bytes)
    torch.cuda.synchronize()
    peak = profile_activation_bytes(model, layout, device, cfg.max_num_batched_tokens)
    free, total = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_reserved(device)
    budget = min(total * cfg.gpu_memory_utilization - ours - peak, free - peak - (1 << 30))
    if budget < block_bytes * 16:
        raise RuntimeError(
            f"not enough GPU memory for the KV cache (budget {budget / 2**30:.2f} GiB, "
            f"{free / 2**30:.1f} GiB free); raise --gpu-memory-utilization or lower "
            "--max-num-batched-tokens"
        )
    log.info(
        "event=kv_budget gib=%.2f weights_and_reserved_gib=%.2f activation_peak_gib=%.2f",
        budget / 2**30,
        ours / 2**30,
        peak / 2**30,
    )
    return int(budget // block_bytes)


@torch.inference_mode()
def profile_activation_bytes(
    model: nn.Module, layout: KVLayout, device: torch.device, num_tokens: int
) -> int:
    """Peak memory of one forward over a full token budget, without a KV cache yet."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    scratch = torch.zeros(
        layout.num_layers,
        2,
        1,
        num_tokens,
        layout.num_kv_heads,
        layout.head_dim,
        dtype=layout.dtype,
        device=device,
    )
    caches = [(scratch[i, 0], scratch[i, 1]) for i in range(layout.num_layers)]
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(
        slot_mapping=pos.clone(),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        max_query_len=num_tokens,
        decode_only=False,
    )
    hidden = model(ids, pos, meta, caches)
    model.compute_logits(hidden[-256:])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    del scratch, caches, hidden
    torch.cuda.empty_cache()
    return peak
