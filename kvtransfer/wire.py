"""kvtransfer's protobuf boundary: KVTarget -> KVDest, pool exports, KV chunks <-> tensors,
the first token's logprob. Only tensor bytes with their dtype name and shape travel, never
pickle."""

from __future__ import annotations

import re

import torch

from kvtransfer.base import KVDest
from kvtransfer.pool import CudaIpcFields, PoolExport
from protos import common_pb2, worker_pb2
from tandem.records import Logprob


# -- dtypes -----------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16", "float32", ...: torch's name without its prefix."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


# -- the first token --------------------------------------------------------------------------
def logprob_to_proto(
    lp: Logprob | None, into: common_pb2.TokenLogprob | None = None
) -> common_pb2.TokenLogprob | None:
    """into: fill this message in place (an element of a repeated field) instead of a new one."""
    if lp is None:
        return None
    p = common_pb2.TokenLogprob() if into is None else into
    p.token_id = lp.token_id
    p.logprob = lp.logprob
    if lp.rank is not None:
        p.rank = lp.rank
    top = p.top
    for t, v in lp.top:
        e = top.add()
        e.token_id = t
        e.logprob = v
    return p


def logprob_from_proto(p: common_pb2.TokenLogprob, present: bool) -> Logprob | None:
    if not present:
        return None
    return Logprob(p.token_id, p.logprob, [(t.token_id, t.logprob) for t in p.top])


def done_to_proto(first_token_id: int, first_logprob: Logprob | None) -> worker_pb2.KVDone:
    done = worker_pb2.KVDone(first_token_id=first_token_id)
    lp = logprob_to_proto(first_logprob)
    if lp is not None:
        done.first_token_logprob.CopyFrom(lp)
    return done


def done_from_proto(done: worker_pb2.KVDone) -> tuple[int, Logprob | None]:
    lp = logprob_from_proto(done.first_token_logprob, done.HasField("first_token_logprob"))
    return done.first_token_id, lp


# -- where the KV goes ------------------------------------------------------------------------
def pool_to_proto(p: PoolExport) -> worker_pb2.KVPoolExport:
    msg = worker_pb2.KVPoolExport(
        transport=p.transport,
        pool_id=p.pool_id,
        host_id=p.host_id,
        shape=list(p.shape),
        dtype=dtype_name(p.dtype),
        shm_path=p.shm_path,
        gpu_uuid=p.gpu_uuid,
    )
    if p.cuda is not None:
        msg.cuda.CopyFrom(worker_pb2.CudaIpcHandle(**p.cuda._asdict()))
    return msg


def pool_from_proto(msg: worker_pb2.KVPoolExport) -> PoolExport:
    try:
        dtype = dtype_from_name(msg.dtype)
    except ValueError:
        raise ValueError(f"KVPoolExport.dtype {msg.dtype!r} is not a torch dtype") from None
    if len(msg.shape) != 6 or min(msg.shape) < 1:
        raise ValueError(f"KVPoolExport.shape {list(msg.shape)} is not a KV pool shape")
    cuda = None
    if msg.HasField("cuda"):
        cuda = CudaIpcFields(*(getattr(msg.cuda, f) for f in CudaIpcFields._fields))
    return PoolExport(
        msg.transport,
        msg.pool_id,
        msg.host_id,
        tuple(msg.shape),
        dtype,
        msg.shm_path,
        msg.gpu_uuid,
        cuda,
    )


MIN_CAPABILITY_BYTES = 16  # a KVTarget's capability, at least (the ledger issues 32)
# host:port, the host a DNS name / IPv4 address or a bracketed IPv6 one: no grpc scheme
# (unix:, dns:///...), no path, no empty part
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?):(\d{1,5})")


def check_kv_address(address: str) -> None:
    """ValueError unless address is a plausible host:port for a decode server's KVTransfer."""
    m = _ADDRESS.fullmatch(address)
    if m is None or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"kv_target.decode_kv_address {address!r} is not host:port (port 1-65535)")


def dest_from_proto(t: worker_pb2.KVTarget, req_id: str, block_size: int) -> KVDest:
    """The KVTarget of req_id as a KVDest (the caller checked block_size and the blocks).
    ValueError, naming the field, for a target no decode server issued: no capability, an
    address that is not host:port, negative block ids."""
    if len(t.capability) < MIN_CAPABILITY_BYTES:
        raise ValueError(
            f"kv_target.capability must be the decode server's token (>= {MIN_CAPABILITY_BYTES}"
            f" bytes), got {len(t.capability)} bytes"
        )
    check_kv_address(t.decode_kv_address)
    if any(b < 0 for b in t.block_ids):
        raise ValueError("kv_target.block_ids must be >= 0")
    return KVDest(
        handoff_id=t.handoff_id,
        address=t.decode_kv_address,
        block_ids=tuple(t.block_ids),
        first_block=t.num_cached_tokens // block_size,
        req_id=req_id,
        transports=tuple(t.transports) or (t.transport or "grpc",),
        pool=pool_from_proto(t.pool) if t.HasField("pool") else None,
        capability=t.capability,
    )


# -- grpc data --------------------------------------------------------------------------------
def chunk_to_proto(
    layer_start: int, layer_end: int, block_offset: int, data: torch.Tensor
) -> worker_pb2.KVChunk:
    """data: a CPU tensor [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
    data = data.contiguous()
    return worker_pb2.KVChunk(
        layer_start=layer_start,
        layer_end=layer_end,
        block_offset=block_offset,
        num_blocks=data.shape[2],
        dtype=dtype_name(data.dtype),
        shape=list(data.shape),
        data=data.view(torch.uint8).numpy().tobytes(),
    )


def chunk_from_proto(chunk: worker_pb2.KVChunk) -> torch.Tensor:
    """The chunk's tensor (its own memory); ValueError when dtype, shape and bytes disagree."""
    dtype = dtype_from_name(chunk.dtype)
    shape = tuple(chunk.shape)
    numel = 1
    for n in shape:
        numel *= n
    if numel * dtype.itemsize != len(chunk.data):
        raise ValueError(f"chunk of {len(chunk.data)} bytes is not {shape}/{chunk.dtype}")
    return torch.frombuffer(bytearray(chunk.data), dtype=dtype).view(shape)
