"""`tandem prefill`: a prefill server (Prefill on one gRPC port)."""

from __future__ import annotations

import argparse
import logging

from kvtransfer.channel import Channels
from kvtransfer.select import KVSenders, offered_transports
from prefill_service.servicer import PrefillServicer
from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import TLSConfig, tls_from_args
from worker.bootstrap import WorkerParts, run_worker
from worker.flags import add_engine_args, engine_config_from_args

SERVICES = [worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]
log = logging.getLogger("tandem.worker")


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, default_port=50100)
    p.add_argument(
        "--kv-push-timeout",
        type=float,
        default=60.0,
        help="seconds one KV handoff (all its slabs) may take before the push is abandoned",
    )


async def _register(args, tls, server, engine, address) -> WorkerParts:
    core = engine.engine  # its KV pool: what the senders read and check decode pools against
    channels = Channels(args.kv_push_timeout, tls)  # tls: this server's files, as a client
    senders = KVSenders(core.kv_cache, args.kv_transport, core.cfg.tensor_parallel_size, channels)
    # auto picks per decode server (same host: a shared pool, else grpc) at its first handoff
    log.info(
        "event=kv_senders_ready kv_transport=%s tensor_parallel_size=%d",
        args.kv_transport, core.cfg.tensor_parallel_size,
    )  # fmt: skip
    servicer = PrefillServicer(engine, senders)
    worker_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
    return WorkerParts(
        role=worker_pb2.WORKER_ROLE_PREFILL,
        # KV pushes in flight: a drain waits for them; the prefill side's
        # tandem:num_active_handoffs
        num_active_handoffs=lambda: servicer.num_pushes,
        close=servicer.close,
        num_kv_handoffs=lambda: servicer.ledger.num_completed,
    )


def run(args: argparse.Namespace, tls: TLSConfig) -> None:
    try:  # a transport forced on this server must fit where its KV cache lives
        device_type = engine_config_from_args(args).torch_device().type
        offered_transports(args.kv_transport, device_type, args.tensor_parallel_size)
    except ValueError as e:
        raise SystemExit(f"tandem prefill: {e}") from None
    run_worker(args, tls, SERVICES, lambda s, e, a: _register(args, tls, s, e, a))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem prefill")
    add_cli_args(p)
    args = p.parse_args(argv)
    run(args, tls_from_args(args, p))
