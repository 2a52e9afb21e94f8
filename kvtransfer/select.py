"""Which KV transport a handoff uses: what the decode server offers, what the sender can reach.

    decode server (receiver)   offers, best first:  cuda_ipc (CUDA pool) | shm (CPU pool), grpc
    prefill server (sender)    picks the first usable one:
        cuda_ipc  same host_id, and the pool's GPU is this process's GPU (same UUID)
        nccl      same host, another GPU: not built (GPU.md: CUDA IPC across GPUs is slow;
                  a pairwise NCCL link is the fast path) -- it slots in here
        shm       same host_id, both processes on CPU
        grpc      always (works across hosts)

`--kv-transport` on either server forces one: the receiver then offers only it, the sender
refuses a handoff whose target does not offer it (or cannot be reached through it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvtransfer.pool import PoolExport

TRANSPORTS = ("grpc", "shm", "cuda_ipc")  # what this code base implements
CHOICES = ("auto", *TRANSPORTS)  # the --kv-transport flag


@dataclass(frozen=True)
class Endpoint:
    """Where the sender runs: what decides which pools it can open."""

    host_id: str
    gpu_uuid: str  # "" when its KV cache is on the CPU


def offered_transports(flag: str, device_type: str, tensor_parallel_size: int = 1) -> list[str]:
    """The transports a worker with its KV pool on device_type can use (a decode server
    offers them; a prefill server is checked against them at start). At tensor-parallel size
    > 1 only grpc: each rank's pool holds only its KV heads, and grpc gathers them."""
    if flag not in CHOICES:
        raise ValueError(f"--kv-transport must be one of {', '.join(CHOICES)}, not {flag!r}")
    if tensor_parallel_size > 1:
        if flag not in ("auto", "grpc"):
            raise ValueError(
                f"--kv-transport {flag} needs --tensor-parallel-size 1"
                " (each rank holds only its KV heads; grpc gathers them)"
            )
        return ["grpc"]
    local = "cuda_ipc" if device_type == "cuda" else "shm"
    if flag == "auto":
        return [local, "grpc"]
    if flag != "grpc" and flag != local:
        raise ValueError(f"--kv-transport {flag} needs the KV cache on {_device_of(flag)}")
    return [flag]


def _device_of(transport: str) -> str:
    return "a CUDA device" if transport == "cuda_ipc" else "the CPU"


def reachable(transport: str, here: Endpoint, pool: PoolExport | None) -> str:
    """Why the sender cannot use transport for this pool ("" when it can)."""
    if transport == "grpc":
        return ""
    if pool is None or pool.transport != transport:
        return f"the decode server exports no {transport} pool"
    if pool.host_id != here.host_id:
        return "the decode server is on another host (or IPC namespace)"
    if transport == "cuda_ipc" and pool.gpu_uuid != here.gpu_uuid:
        return "the decode server's KV pool is on another GPU"
    if transport == "shm" and here.gpu_uuid:
        return "this server's KV cache is on a GPU"
    return ""


def choose_transport(
    flag: str, here: Endpoint, offered: Sequence[str], pool: PoolExport | None
) -> str:
    """Sender: the transport for one handoff. Raises ValueError when flag forces one that
    this target cannot take."""
    offered = list(offered) or ["grpc"]
    if flag != "auto":
        if flag not in offered:
            raise ValueError(
                f"this prefill server is forced to --kv-transport {flag}; the decode server "
                f"offers {', '.join(offered)}"
            )
        why = reachable(flag, here, pool)
        if why:
            raise ValueError(f"--kv-transport {flag} cannot reach the decode server: {why}")
        return flag
    for name in ("cuda_ipc", "shm", "grpc"):  # best first; nccl goes after cuda_ipc
        if name in offered and not reachable(name, here, pool):
            return name
    raise ValueError(f"no usable KV transport among {', '.join(offered)}")
