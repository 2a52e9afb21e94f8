"""`tandem decode`: a decode server (Decode + KVTransfer on one gRPC port)."""

from __future__ import annotations

import argparse

from decode_service.servicer import DecodeServicer
from decode_service.worker_common import WorkerParts, add_engine_args, run_worker
from kvtransfer.grpc_transport import KVTransferServicer
from kvtransfer.ledger import DEFAULT_STALL_S, HandoffLedger
from protos import worker_pb2, worker_pb2_grpc

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


async def _register(args, server, engine, address) -> WorkerParts:
    ledger = HandoffLedger(args.kv_lease_seconds, args.kv_stall_seconds)
    worker_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(engine, ledger, address), server)
    runner = engine.engine.runner
    tp_write = None
    if runner.tp.size > 1:  # the scatter to every rank runs between engine steps

        async def tp_write(block_ids, layer_start, layer_end, kv) -> None:
            await engine.call(runner.scatter_kv, block_ids, layer_start, layer_end, kv)

    worker_pb2_grpc.add_KVTransferServicer_to_server(
        KVTransferServicer(ledger, runner.kv_cache, runner.kv_transfer_shape, tp_write), server
    )

    async def close() -> None:
        return None

    return WorkerParts(
        role=worker_pb2.WORKER_ROLE_DECODE,
        num_active_handoffs=lambda: ledger.num_active,
        close=close,
        kv_address=address,  # KVTransfer shares the Decode port
    )


def run(args: argparse.Namespace) -> None:
    run_worker(args, SERVICES, lambda s, e, a: _register(args, s, e, a))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem decode")
    add_cli_args(p)
    run(p.parse_args(argv))
