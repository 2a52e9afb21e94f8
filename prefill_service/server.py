"""`tandem prefill`: a prefill server (Prefill on one gRPC port)."""

from __future__ import annotations

import argparse
import asyncio

from decode_service.worker_common import add_engine_args, configure_logging, serve
from kvtransfer.grpc_transport import GrpcKVSender
from prefill_service.servicer import PrefillServicer
from protos import worker_pb2, worker_pb2_grpc

SERVICES = [worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, default_port=50100)
    p.add_argument("--kv-push-timeout", type=float, default=60.0)


async def _register(args, server, engine, address):
    servicer = PrefillServicer(engine, GrpcKVSender(args.kv_push_timeout))
    worker_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    return servicer.close


def run(args: argparse.Namespace) -> None:
    configure_logging(args.log_level)
    asyncio.run(serve(args, SERVICES, lambda s, e, a: _register(args, s, e, a)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem prefill")
    add_cli_args(p)
    run(p.parse_args(argv))
