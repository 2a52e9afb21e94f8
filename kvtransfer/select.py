"""Which KV transport a handoff uses: what the decode server offers, what the sender can reach.

    decode server (receiver)   offers, best first:  cuda_ipc (CUDA pool) | shm (CPU pool), grpc
    prefill server (sender)    picks the first usable one (kvtransfer/registry.py's order):
        cuda_ipc  same host_id, and the pool's GPU is this process's GPU (same UUID)
        (nixl)    another GPU or host, written straight into the reserved blocks: not built;
                  it would slot in here as one more registered transport
        shm       same host_id, both processes on CPU
        grpc      always (works across hosts)
    A same-host pool that still cannot be opened (another mount namespace's /dev/shm, another
    layout) falls back to grpc in auto mode. At tensor-parallel size > 1 only grpc: each
    rank's pool holds only its KV heads, and only grpc's copy gathers them.

`--kv-transport` on either server forces one: the receiver then offers only it, the sender
refuses a handoff whose target does not offer it (or cannot be reached through it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvtransfer.base import Endpoint, EngineKV, KVDest, KVSender, KVSource
from kvtransfer.channel import Channels
from kvtransfer.pool import PoolExport, ShmPoolFile, export_cuda_pool, gpu_uuid, host_id
from kvtransfer.registry import SENDERS
from tandem.log_config import quote

log = logging.getLogger(__name__)

CHOICES = ("auto", *SENDERS)  # the --kv-transport flag


# -- decode server: what it offers ------------------------------------------------------------
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


def pool_file_for(offered: Sequence[str]) -> ShmPoolFile | None:
    """Decode side, before the engine maps its KV pool: the shm pool file, when shm is
    offered (the engine maps the pool into it: EngineConfig.kv_cache_file)."""
    return ShmPoolFile() if "shm" in offered else None


def export_offer(
    flag: str, offered: list[str], kv_cache: torch.Tensor, shm: ShmPoolFile | None
) -> tuple[list[str], PoolExport | None]:
    """Decode side, once the engine runs: the transports to offer and the pool exported to
    same-host senders. A pool CUDA IPC cannot share (e.g. an allocator whose memory it cannot
    export) drops cuda_ipc from the offer in auto mode; forced, it raises ValueError."""
    if shm is not None:
        return offered, shm.export(kv_cache)
    if "cuda_ipc" not in offered:
        return offered, None
    try:
        return offered, export_cuda_pool(kv_cache)
    except RuntimeError as e:
        if flag != "auto":
            raise ValueError(f"cannot export the KV pool: {e}") from e
        log.warning("event=kv_pool_not_exported transport=cuda_ipc error=%s", quote(e))
        return [t for t in offered if t != "cuda_ipc"], None


# -- prefill server: which one a handoff takes ------------------------------------------------
def reachable(transport: str, here: Endpoint, pool: PoolExport | None) -> str:
    """Why the sender cannot use transport for this pool ("" when it can)."""
    return SENDERS[transport].unreachable(here, pool)


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
    for name in SENDERS:  # best first
        if name in offered and not reachable(name, here, pool):
            return name
    raise ValueError(f"no usable KV transport among {', '.join(offered)}")


class KVSenders:
    """A prefill server's senders, one per registered transport, and the pick per handoff.

    kv_cache is this rank's pool: where held blocks are read from, and what a decode pool's
    layout must match.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        flag: str = "auto",
        tensor_parallel_size: int = 1,
        channels: Channels | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.flag = flag  # --kv-transport: auto, or the one forced
        self.tensor_parallel_size = tensor_parallel_size
        self.channels = channels or Channels()
        self.here = Endpoint(host_id(), gpu_uuid(kv_cache.device))
        self.senders = {name: cls(self.channels, self.here) for name, cls in SENDERS.items()}
        # exports auto mode could not open: grpc. Keyed by the whole export, not its id: a
        # forged target naming a live pool's id with a bad path must not demote that pool
        self._unreachable: set[PoolExport] = set()

    async def pick(self, dest: KVDest) -> KVSender:
        """The sender for this handoff, connected; ValueError when none fits."""
        offered = list(dest.transports)
        grpc = self.senders["grpc"]
        if self.tensor_parallel_size > 1:
            # the other transports copy one local pool holding every KV head; at TP > 1 each
            # rank holds only its heads, and only grpc's copy gathers them
            if "grpc" not in offered:
                raise ValueError("at tensor-parallel size > 1 KV can only be sent over grpc")
            return grpc
        sender = self.senders[choose_transport(self.flag, self.here, offered, dest.pool)]
        if sender is grpc:
            return grpc
        auto = self.flag == "auto"
        pool = dest.pool
        if auto and pool in self._unreachable and "grpc" in offered:
            return grpc
        try:  # once per decode server (its pool is cached), here so a failure still leaves grpc
            await sender.connect(dest, self.kv_cache)
        except (OSError, RuntimeError, ValueError) as e:
            why = f"cannot open the decode server's {sender.name} pool: {e}"
            if not auto:
                raise ValueError(why) from e
            if pool not in self._unreachable:
                if len(self._unreachable) >= 256:  # bounded, whatever callers send
                    self._unreachable.clear()
                self._unreachable.add(pool)
                log.warning("event=kv_pool_unopenable transport=%s error=%s", sender.name, quote(e))
            if "grpc" not in offered:
                raise ValueError(why) from e
            return grpc
        return sender

    async def read(
        self, sender: KVSender, engine: EngineKV, req_id: str, first_block: int
    ) -> KVSource | None:
        """req_id's KV from first_block, as sender reads it; None when the request is gone."""
        return await sender.read(engine, self.kv_cache, req_id, first_block)

    async def close(self) -> None:
        for sender in self.senders.values():
            await sender.close()
        await self.channels.close()
