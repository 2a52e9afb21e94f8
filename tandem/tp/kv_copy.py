"""KV handoff at any tensor-parallel size: the wire carries every KV head (the TP=1 layout).

The prefill side's rank 0 gathers its ranks' heads of the blocks to send; the decode side's
rank 0 scatters each received slab over its ranks, each keeping its own heads. Rank 0 sends
the command over StepSync (KV_GATHER / KV_SCATTER) and the other ranks, in
ModelRunner.serve_worker, run their half (gather_part / scatter_part) with it.
"""

from __future__ import annotations

import torch

from tandem.tp.group import TPGroup
from tandem.tp.step_sync import KV_GATHER, KV_SCATTER, StepSync


class KVCopier:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        num_kv_heads: int,
        tp: TPGroup,
        sync: StepSync | None,
        device: torch.device,
    ) -> None:
        self.kv_cache = kv_cache  # this rank's pool, its num_kv_heads / tp.size heads
        self.tp = tp
        self.sync = sync  # None at tensor-parallel size 1
        self.device = device
        shape = list(kv_cache.shape)
        shape[4] = num_kv_heads
        # the pool's shape with all KV heads (the TP=1 layout the grpc transport carries)
        self.transfer_shape = tuple(shape)

    @torch.inference_mode()
    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """Rank 0: blocks block_ids of every layer with all KV heads,
        [layers, 2, len(block_ids), block_size, num_kv_heads, head_dim] on this device."""
        if self.sync is not None:
            self.sync.send_kv(KV_GATHER, block_ids)
        return self.gather_part(block_ids)

    def gather_part(self, block_ids: list[int]) -> torch.Tensor | None:
        """Every rank: its heads of the blocks, gathered on rank 0 (the others get None)."""
        index = torch.tensor(block_ids, device=self.device)
        return self.tp.gather(self.kv_cache.index_select(2, index), dim=4)

    @torch.inference_mode()
    def scatter(
        self, block_ids: list[int], layer_start: int, layer_end: int, kv: torch.Tensor
    ) -> None:
        """Rank 0: store kv (all KV heads, [layer_end - layer_start, 2, len(block_ids), ...])
        into blocks block_ids; each rank keeps its heads."""
        if self.sync is not None:
            self.sync.send_kv(KV_SCATTER, block_ids, layer_start, layer_end)
        self.scatter_part(block_ids, layer_start, layer_end, kv)

    def scatter_part(self, block_ids, layer_start, layer_end, kv=None) -> None:
        """Every rank: rank 0's kv (broadcast at size > 1; the other ranks pass None), this
        rank's heads of it into the blocks."""
        index = torch.tensor(block_ids, device=self.device)
        if self.tp.size > 1:
            shape = list(self.transfer_shape)
            shape[0], shape[2] = layer_end - layer_start, len(block_ids)
            buf = torch.empty(shape, dtype=self.kv_cache.dtype, device=self.device)
            if kv is not None:
                buf.copy_(kv)
            h = self.kv_cache.shape[4]
            kv = self.tp.broadcast(buf)[:, :, :, :, self.tp.rank * h : (self.tp.rank + 1) * h]
        self.kv_cache[layer_start:layer_end].index_copy_(2, index, kv.to(self.device))
