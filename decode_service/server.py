"""`tandem decode`: a decode server (Decode + KVTransfer on one gRPC port)."""

from __future__ import annotations

import argparse
import logging

from decode_service.servicer import DecodeServicer, KVOffer
from kvtransfer.direct_receiver import SameHostKVTransferServicer
from kvtransfer.direct_transport import pool_to_proto
from kvtransfer.ledger import DEFAULT_STALL_S, HandoffLedger
from kvtransfer.pool import ShmPoolFile, export_cuda_pool
from kvtransfer.select import offered_transports
from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import TLSConfig, tls_from_args
from worker.bootstrap import (
    WorkerParts,
    add_engine_args,
    engine_config_from_args,
    run_worker,
)

log = logging.getLogger("tandem.decode")

SERVICES = [
    worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name,
]


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, default_port=50200)
    p.add_argument(
        "--kv-lease-seconds", type=float, default=60.0, help="reclaim reserved blocks after this"
    )
    p.add_argument(
        "--kv-stall-seconds",
        type=float,
        default=DEFAULT_STALL_S,
        help="fail a KV handoff whose stream sends no chunk for this long",
    )


async def _register(args, server, engine, address, offered, shm) -> WorkerParts:
    ledger = HandoffLedger(args.kv_lease_seconds, args.kv_stall_seconds)
    core = engine.engine
    kv_cache = core.kv_cache
    export = None
    if shm is not None:
        export = shm.export(kv_cache)
    elif "cuda_ipc" in offered:
        try:
            export = export_cuda_pool(kv_cache)
        except RuntimeError as e:  # e.g. an allocator whose memory CUDA IPC cannot share
            if args.kv_transport != "auto":
                raise SystemExit(f"tandem decode: cannot export the KV pool: {e}") from e
            log.warning("event=kv_pool_not_exported transport=cuda_ipc error=%s", e)
            offered = [t for t in offered if t != "cuda_ipc"]
    offer = KVOffer(offered, pool_to_proto(export) if export else None)
    servicer = DecodeServicer(engine, ledger, address, offer)
    worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    tp_write = None
    if core.cfg.tensor_parallel_size > 1:  # the scatter to every rank runs between steps
        tp_write = engine.write_kv

    worker_pb2_grpc.add_KVTransferServicer_to_server(
        SameHostKVTransferServicer(
            ledger, kv_cache, offered, export, core.kv_transfer_shape, tp_write
        ),
        server,
    )

    async def close() -> None:
        return None

    return WorkerParts(
        role=worker_pb2.WORKER_ROLE_DECODE,
        num_active_handoffs=lambda: ledger.num_active,
        close=close,
        kv_address=address,  # KVTransfer shares the Decode port
        num_kv_handoffs=lambda: ledger.num_completed,
        num_session_requests=lambda: servicer.num_session_requests,
    )


def run(args: argparse.Namespace, tls: TLSConfig) -> None:
    device_type = engine_config_from_args(args).torch_device().type
    try:  # at TP > 1 grpc only: no shm pool file, which every rank would map
        offered = offered_transports(args.kv_transport, device_type, args.tensor_parallel_size)
    except ValueError as e:
        raise SystemExit(f"tandem decode: {e}") from None
    # the shm pool file must exist before the engine maps its KV pool into it
    shm = ShmPoolFile() if "shm" in offered else None
    args.kv_cache_file = shm.path if shm is not None else ""
    try:
        run_worker(args, tls, SERVICES, lambda s, e, a: _register(args, s, e, a, offered, shm))
    finally:
        if shm is not None:
            shm.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem decode")
    add_cli_args(p)
    args = p.parse_args(argv)
    run(args, tls_from_args(args, p))
