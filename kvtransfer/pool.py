"""A decode server's KV pool, shared with prefill servers on the same host.

The pool is the runner's one tensor [layers, 2, num_blocks, block_size, kv_heads, head_dim].
Two ways to share it, both exported once per decode process and opened once per sender:

    shm       the pool lives in a file on /dev/shm (the runner maps it, `kv_cache_file`);
              the sender maps the same file by path
    cuda_ipc  the pool's CUDA storage, through torch's storage IPC handle
              (UntypedStorage._share_cuda_ -> fields of KVPoolExport.cuda -> _new_shared_cuda)

`PoolExport` is the transport-neutral description (what KVTarget.pool carries); its protobuf
form is kvtransfer/wire.py's. Which sender opens which pool: kvtransfer/shm_transport.py and
kvtransfer/cuda_ipc_transport.py.
"""

from __future__ import annotations

import fcntl
import glob
import mmap
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import torch

SHM_DIR = "/dev/shm"
SHM_PREFIX = "tandem-kv-"


@cache
def host_id() -> str:
    """Who can open this process's shared memory: the running kernel (boot_id) and the IPC
    namespace. Containers started with `ipc: host` share both although their hostnames
    differ; processes in separate IPC namespaces or on other hosts never match."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{os.readlink('/proc/self/ns/ipc')}"


def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID ("" for a CPU device): device indices differ between processes
    (CUDA_VISIBLE_DEVICES), the UUID does not."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def local_cuda_device(uuid_str: str) -> torch.device | None:
    """This process's CUDA device with that UUID, or None."""
    if not uuid_str or not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid_str:
            return torch.device("cuda", i)
    return None


class CudaIpcFields(NamedTuple):
    """torch's _share_cuda_() tuple less the device index (meaningful only to the exporter):
    in _new_shared_cuda's order after the device, named as CudaIpcHandle's fields."""

    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


@dataclass(frozen=True)
class PoolExport:
    transport: str  # "shm" | "cuda_ipc"
    pool_id: str  # unique per export
    host_id: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shm_path: str = ""
    gpu_uuid: str = ""
    cuda: CudaIpcFields | None = field(default=None)


# -- shm --------------------------------------------------------------------------------------
class ShmPoolFile:
    """Decode side: the pool file's name and lifetime. Held with a shared flock for the life of
    the process, so a later server can tell a dead server's leftover file (no lock) from a live
    one and remove it; removed on close."""

    def __init__(self, directory: str = SHM_DIR) -> None:
        sweep_stale_pool_files(directory)
        self.pool_id = uuid.uuid4().hex
        self.path = os.path.join(directory, f"{SHM_PREFIX}{self.pool_id}")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def export(self, kv_cache: torch.Tensor) -> PoolExport:
        if kv_cache.device.type != "cpu" or not kv_cache.is_contiguous():
            raise ValueError("the shm transport needs a contiguous CPU KV pool")
        return PoolExport(
            "shm", self.pool_id, host_id(), tuple(kv_cache.shape), kv_cache.dtype, self.path
        )

    def close(self) -> None:
        if self._fd >= 0:
            with _ignore_missing():
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1


def sweep_stale_pool_files(directory: str = SHM_DIR) -> list[str]:
    """Remove pool files no live process holds (their server was killed); the removed paths."""
    removed = []
    for path in glob.glob(os.path.join(directory, f"{SHM_PREFIX}*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live server holds it
        finally:
            os.close(fd)
        with _ignore_missing():
            os.unlink(path)
            removed.append(path)
    return removed


class _ignore_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is FileNotFoundError


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel


def map_shm_pool(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Decode side (the pool's owner) only: the pool tensor over its own pool file (creating
    the file, zero-filled, when missing): writes land in the file, every process that maps it
    sees them. Senders use open_shm_pool, which never creates or resizes a file."""
    numel = _numel(shape)
    if os.path.exists(path) and os.path.getsize(path) not in (0, numel * dtype.itemsize):
        raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, not a pool of {shape}")
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


_POOL_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # ShmPoolFile's are uuid4().hex


def open_shm_pool(export: PoolExport, directory: str = SHM_DIR) -> torch.Tensor:
    """Sender side: the decode server's pool file, mapped shared. The path comes from the
    network (KVPoolExport.shm_path), so it is opened only if it is `directory`/tandem-kv-<its
    pool id>, a regular file (the last component no symlink: O_NOFOLLOW; one link), owned by
    this uid, of exactly the size the export's shape and dtype imply, and held by a live
    decode server (ShmPoolFile's shared lock). Never created, truncated or grown: the checks
    and the map use one descriptor, so the file checked is the file mapped. OSError /
    ValueError, naming the reason, before anything is written."""
    path = export.shm_path
    want = os.path.join(directory, SHM_PREFIX + export.pool_id)
    if not _POOL_ID.fullmatch(export.pool_id) or path != want:
        raise ValueError(
            f"KVPoolExport.shm_path {path!r} is not a tandem pool file of this host"
            f" ({directory}/{SHM_PREFIX}<pool_id>)"
        )
    nbytes = _numel(export.shape) * export.dtype.itemsize
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ValueError(f"{path} is not a regular file with one link")
        if st.st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to uid {st.st_uid}, not this server's")
        if st.st_size != nbytes:
            raise ValueError(
                f"{path} holds {st.st_size} bytes, not a pool of {export.shape}/{export.dtype}"
            )
        try:  # a live server holds a shared lock on its pool file: no exclusive one for us
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise ValueError(f"{path} is no live decode server's pool file")
        mapped = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the file
    return torch.frombuffer(mapped, dtype=export.dtype).view(export.shape)


# -- cuda_ipc ---------------------------------------------------------------------------------
def export_cuda_pool(kv_cache: torch.Tensor, pool_id: str | None = None) -> PoolExport:
    """Decode side, once: the IPC handle of the pool's CUDA storage."""
    if kv_cache.device.type != "cuda" or not kv_cache.is_contiguous():
        raise ValueError("the cuda_ipc transport needs a contiguous CUDA KV pool")
    if kv_cache.storage_offset() != 0:
        raise ValueError("the KV pool must start at its storage's first element")
    (_device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
        kv_cache.untyped_storage()._share_cuda_()
    )
    # every field is bytes / int / bool (_new_shared_cuda checks the types); the event handle
    # is read only when ev_sync is set
    fields = CudaIpcFields(
        bytes(handle), size, offset, bytes(rc_handle), rc_offset, bytes(ev_handle or b""), ev_sync
    )
    return PoolExport(
        "cuda_ipc",
        pool_id or uuid.uuid4().hex,
        host_id(),
        tuple(kv_cache.shape),
        kv_cache.dtype,
        gpu_uuid=gpu_uuid(kv_cache.device),
        cuda=fields,
    )


def open_cuda_pool(export: PoolExport) -> torch.Tensor:
    """Sender side: the decode server's pool as a tensor of this process (same GPU)."""
    device = local_cuda_device(export.gpu_uuid)
    if device is None or export.cuda is None:
        raise ValueError(f"GPU {export.gpu_uuid!r} of the pool is not visible to this process")
    c = export.cuda
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(device.index, *c)
    if _numel(export.shape) * export.dtype.itemsize > storage.nbytes():
        raise ValueError("the IPC storage is smaller than the pool's shape")
    t = torch.empty(0, dtype=export.dtype, device=device)
    t.set_(storage, 0, export.shape)  # contiguous strides
    return t
