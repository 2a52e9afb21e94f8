"""`tandem prefill`: a prefill server (Prefill on one gRPC port)."""

from __future__ import annotations

import argparse

from decode_service.worker_common import WorkerParts, add_engine_args, run_worker
from kvtransfer.grpc_transport import GrpcKVSender
from prefill_service.servicer import PrefillServicer
from protos import worker_pb2, worker_pb2_grpc
from tandem.grpc_tls import TLSConfig, tls_from_args

SERVICES = [worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]


class CountingKVSender(GrpcKVSender):
    """Counts KV pushes in flight: a drain waits for them, and they are the prefill side's
    `tandem:num_active_handoffs`."""

    def __init__(self, timeout_s: float, tls: TLSConfig) -> None:
        super().__init__(timeout_s, tls)
        self.num_active = 0

    async def send(self, *args, **kwargs) -> None:
        self.num_active += 1
        try:
            await super().send(*args, **kwargs)
        finally:
            self.num_active -= 1


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, default_port=50100)
    p.add_argument("--kv-push-timeout", type=float, default=60.0)


async def _register(args, tls, server, engine, address) -> WorkerParts:
    sender = CountingKVSender(args.kv_push_timeout, tls)
    servicer = PrefillServicer(engine, sender)
    worker_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    return WorkerParts(
        role=worker_pb2.WORKER_ROLE_PREFILL,
        num_active_handoffs=lambda: sender.num_active,
        close=servicer.close,
    )


def run(args: argparse.Namespace, tls: TLSConfig) -> None:
    run_worker(args, tls, SERVICES, lambda s, e, a: _register(args, tls, s, e, a))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem prefill")
    add_cli_args(p)
    args = p.parse_args(argv)
    run(args, tls_from_args(args, p))
