"""What prefill and decode servers share: engine flags, stats, and the gRPC server lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtransfer.grpc_transport import CHANNEL_OPTIONS
from protos import worker_pb2
from tandem.async_engine import AsyncEngine
from tandem.config import EngineConfig
from tandem.engine import LLMEngine

log = logging.getLogger(__name__)


def add_engine_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument(
        "--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=default_port)
    p.add_argument("--advertise-host", default=None, help="host others use to reach this server")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"]
    )
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="warning")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        kernel_backend=args.kernel_backend,
        seed=args.seed,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )


async def worker_stats(engine: AsyncEngine, num_active_handoffs: int = 0) -> worker_pb2.WorkerStats:
    def collect():
        s = engine.engine.stats()
        in_flight = sum(
            r.num_tokens - r.num_computed_tokens for r in engine.engine.scheduler.waiting
        ) + sum(
            max(0, r.num_prompt_tokens - r.num_computed_tokens)
            for r in engine.engine.scheduler.running
        )
        return s, in_flight

    s, in_flight = await engine.call(collect)
    return worker_pb2.WorkerStats(
        num_running=s.num_running,
        num_waiting=s.num_waiting,
        num_free_blocks=s.num_free_blocks,
        num_total_blocks=s.num_total_blocks,
        num_cached_blocks=s.num_cached_blocks,
        prefix_cache_hits=s.prefix_cache_hits,
        prefix_cache_queries=s.prefix_cache_queries,
        num_active_handoffs=num_active_handoffs,
        block_size=engine.engine.cfg.block_size,
        in_flight_prompt_tokens=in_flight,
    )


async def serve(
    args: argparse.Namespace,
    service_names: list[str],
    register: Callable[
        [grpc.aio.Server, AsyncEngine, str], Awaitable[Callable[[], Awaitable[None]]]
    ],
) -> None:
    """config -> engine -> grpc.aio.server -> servicers + health + reflection -> start ->
    signal handlers -> stop(grace) -> shutdown."""
    engine = AsyncEngine(LLMEngine(engine_config_from_args(args)))
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    address = f"{args.advertise_host or args.host}:{port}"
    cleanup = await register(server, engine, address)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(
        f"{service_names[0].rsplit('.', 1)[-1].lower()} server listening on {address}", flush=True
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down address=%s", address)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)
    await cleanup()
    engine.shutdown()
