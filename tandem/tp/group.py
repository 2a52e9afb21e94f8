"""The ranks' process groups and the few collectives tensor parallelism needs.

Two groups: `device` (NCCL on CUDA, gloo on CPU) carries the model's all-reduces and the logits
gather; `cpu` (gloo) carries the step inputs rank 0 broadcasts and small host values. Ranks
other than 0 block in the cpu group between steps: a gloo receive sleeps in a socket, where an
NCCL one would spin a GPU stream, and it may wait as long as a server stays idle (its timeout is
effectively unbounded; a dead rank 0 ends the others through PDEATHSIG, see launch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tandem.config import ModelConfig

IDLE_TIMEOUT = timedelta(days=365)
DEVICE_TIMEOUT = timedelta(minutes=30)  # one collective inside a step (incl. weight loading)


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group; size 1: no collectives at all."""

    rank: int = 0
    size: int = 1
    device_group: Any = None  # torch ProcessGroup (NCCL on CUDA, gloo on CPU)
    cpu_group: Any = None  # gloo ProcessGroup for host-side traffic

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the row-parallel projections' partial sums)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Rank 0 gets the ranks' x concatenated along dim (rank order); the others None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.device_group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place (device group)."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.device_group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (KV block counts must agree across ranks)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def init_groups(rank: int, size: int, store: dist.Store, device: torch.device) -> TPGroup:
    """Collective over all ranks (each calls it once the store's rendezvous is done)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=size, timeout=DEVICE_TIMEOUT
    )
    cpu = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, size, dist.group.WORLD, cpu)


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """vLLM's rule: every rank holds whole heads, so tp must divide the head counts."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if cfg.num_heads % tp:
        raise ValueError(
            f"total number of attention heads ({cfg.num_heads}) must be divisible by "
            f"tensor parallel size ({tp})"
        )
    if cfg.num_kv_heads % tp:
        raise ValueError(
            f"total number of KV heads ({cfg.num_kv_heads}) must be divisible by tensor "
            f"parallel size ({tp}); KV-head replication is not implemented"
        )
    if cfg.intermediate_size % tp:
        raise ValueError(
            f"intermediate_size ({cfg.intermediate_size}) must be divisible by tensor "
            f"parallel size ({tp})"
        )
