"""`tandem decode`: a decode server (Decode + KVTransfer on one gRPC port)."""

from __future__ import annotations

import argparse
import asyncio

from decode_service.servicer import DecodeServicer
from decode_service.worker_common import add_engine_args, configure_logging, serve
from kvtransfer.grpc_transport import KVTransferServicer
from kvtransfer.ledger import HandoffLedger
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


async def _register(args, server, engine, address):
    ledger = HandoffLedger(args.kv_lease_seconds)
    worker_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(engine, ledger, address), server)
    worker_pb2_grpc.add_KVTransferServicer_to_server(
        KVTransferServicer(ledger, engine.engine.runner.kv_cache), server
    )

    async def cleanup():
        return None

    return cleanup


def run(args: argparse.Namespace) -> None:
    configure_logging(args.log_level)
    asyncio.run(serve(args, SERVICES, lambda s, e, a: _register(args, s, e, a)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem decode")
    add_cli_args(p)
    run(p.parse_args(argv))
