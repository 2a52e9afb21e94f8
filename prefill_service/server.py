"""`tandem prefill`: a prefill server (Prefill on one gRPC port)."""

from __future__ import annotations

import argparse

from decode_service.worker_common import (
    WorkerParts,
    add_engine_args,
    engine_config_from_args,
    run_worker,
)
from kvtransfer.grpc_transport import GrpcKVSender
from kvtransfer.select import offered_transports
from prefill_service.servicer import PrefillServicer
from protos import worker_pb2, worker_pb2_grpc

SERVICES = [worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, default_port=50100)
    p.add_argument("--kv-push-timeout", type=float, default=60.0)


async def _register(args, server, engine, address) -> WorkerParts:
    servicer = PrefillServicer(engine, GrpcKVSender(args.kv_push_timeout), args.kv_transport)
    worker_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    return WorkerParts(
        role=worker_pb2.WORKER_ROLE_PREFILL,
        # KV pushes in flight: a drain waits for them; the prefill side's
        # tandem:num_active_handoffs
        num_active_handoffs=lambda: servicer.num_pushes,
        close=servicer.close,
        num_kv_handoffs=lambda: servicer.ledger.num_completed,
    )


def run(args: argparse.Namespace) -> None:
    try:  # a transport forced on this server must fit where its KV cache lives
        offered_transports(args.kv_transport, engine_config_from_args(args).torch_device().type)
    except ValueError as e:
        raise SystemExit(f"tandem prefill: {e}") from None
    run_worker(args, SERVICES, lambda s, e, a: _register(args, s, e, a))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem prefill")
    add_cli_args(p)
    run(p.parse_args(argv))
