"""The `shm` KV transport: both servers on the CPU of one host (same kernel and IPC
namespace). The decode server's pool lives in a /dev/shm file (kvtransfer/pool.py,
ShmPoolFile); the sender maps the same file by path and writes the reserved blocks itself
(the protocol: kvtransfer/direct_transport.py). The path arrives over the network, so the
sender opens only a live pool file of its own directory and uid (pool.open_shm_pool)."""

from __future__ import annotations

import torch

from kvtransfer.base import Endpoint
from kvtransfer.direct_transport import SLAB_BYTES, DirectReceiver, DirectSender
from kvtransfer.pool import SHM_DIR, PoolExport, open_shm_pool


class ShmSender(DirectSender):
    name = "shm"

    def __init__(
        self, channels, here: Endpoint, slab_bytes: int = SLAB_BYTES, shm_dir: str = SHM_DIR
    ) -> None:
        super().__init__(channels, here, slab_bytes)
        self.shm_dir = shm_dir  # the only directory pool files are opened from

    @classmethod
    def unreachable_on_host(cls, here: Endpoint, pool: PoolExport) -> str:
        return "this server's KV cache is on a GPU" if here.gpu_uuid else ""

    def open_pool(self, export: PoolExport) -> torch.Tensor:
        # a path elsewhere, a symlink, a file not ours or of another size: refused
        # (FileNotFoundError e.g. for another mount namespace's /dev/shm)
        return open_shm_pool(export, self.shm_dir)


class ShmReceiver(DirectReceiver):
    name = "shm"
