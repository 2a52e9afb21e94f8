"""The `shm` KV transport: both servers on the CPU of one host (same kernel and IPC
namespace). The decode server's pool lives in a /dev/shm file (kvtransfer/pool.py,
ShmPoolFile); the sender maps the same file by path and writes the reserved blocks itself
(the protocol: kvtransfer/direct_transport.py)."""

from __future__ import annotations

import os

import torch

from kvtransfer.base import Endpoint
from kvtransfer.direct_transport import DirectReceiver, DirectSender
from kvtransfer.pool import PoolExport, map_shm_pool


class ShmSender(DirectSender):
    name = "shm"

    @classmethod
    def unreachable_on_host(cls, here: Endpoint, pool: PoolExport) -> str:
        return "this server's KV cache is on a GPU" if here.gpu_uuid else ""

    @staticmethod
    def open_pool(export: PoolExport) -> torch.Tensor:
        if not os.path.exists(export.shm_path):  # e.g. another mount namespace's /dev/shm
            raise FileNotFoundError(f"pool file {export.shm_path} is not visible here")
        return map_shm_pool(export.shm_path, export.shape, export.dtype)


class ShmReceiver(DirectReceiver):
    name = "shm"
