"""`tandem decode`: a decode server (Decode + KVTransfer on one gRPC port)."""

from __future__ import annotations

import argparse
import logging

from decode_service.servicer import DecodeServicer, KVOffer
from kvtransfer.base import DecodeKV
from kvtransfer.ledger import DEFAULT_STALL_S, HandoffLedger
from kvtransfer.receiver import KVTransferServicer
from kvtransfer.registry import RECEIVERS
from kvtransfer.select import export_offer, offered_transports, pool_file_for
from kvtransfer.wire import pool_to_proto
from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import TLSConfig, tls_from_args
from worker.bootstrap import WorkerParts, run_worker
from worker.flags import add_engine_args, engine_config_from_args

SERVICES = [
    worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name,
]
log = logging.getLogger("tandem.worker")


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
    try:  # the pool shared with same-host senders, if one is offered
        offered, export = export_offer(args.kv_transport, offered, core.kv_cache, shm)
    except ValueError as e:
        raise SystemExit(f"tandem decode: {e}") from e
    offer = KVOffer(offered, pool_to_proto(export) if export else None)
    log.info(
        "event=kv_transports_offered transports=%s shared_pool=%s",
        ",".join(offered), export.transport if export else "none",
    )  # fmt: skip
    servicer = DecodeServicer(engine, ledger, address, offer)
    worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    # at TP > 1 received KV is scattered over every rank by the engine, between steps
    tp_write = engine.write_kv if core.cfg.tensor_parallel_size > 1 else None
    kv = DecodeKV(core.kv_cache, core.kv_transfer_shape, tp_write, export)
    receivers = {name: RECEIVERS[name](kv) for name in offered}
    worker_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(ledger, receivers), server)

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
    shm = pool_file_for(offered)
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
