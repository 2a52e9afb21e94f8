"""The `cuda_ipc` KV transport: both servers on the same GPU of one host. The decode server
exports its pool once through torch's CUDA storage IPC handle (kvtransfer/pool.py); the
sender opens it once and copies its held blocks straight into the reserved ones on a side
stream (the protocol: kvtransfer/direct_transport.py)."""

from __future__ import annotations

import torch

from kvtransfer.base import Endpoint
from kvtransfer.direct_transport import DirectReceiver, DirectSender
from kvtransfer.pool import PoolExport, open_cuda_pool


class CudaIpcSender(DirectSender):
    name = "cuda_ipc"

    @classmethod
    def unreachable_on_host(cls, here: Endpoint, pool: PoolExport) -> str:
        # another GPU of this host: CUDA IPC across GPUs is slow (GPU.md); a transport that
        # reaches it (nccl, nixl) would be its own file, placed after this one in the registry
        return (
            "the decode server's KV pool is on another GPU"
            if pool.gpu_uuid != here.gpu_uuid
            else ""
        )

    def open_pool(self, export: PoolExport) -> torch.Tensor:
        return open_cuda_pool(export)


class CudaIpcReceiver(DirectReceiver):
    name = "cuda_ipc"
