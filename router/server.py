"""`tandem router`: the public gRPC front door.

config -> engine -> grpc.aio.server -> Router + Registry servicers + health + reflection ->
start -> SIGTERM/SIGINT -> stop(grace) -> shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.engine import RouterEngine
from router.metrics import PrefillDecisionCollector, RouterMetrics
from router.policies import POLICIES
from router.reasoning import REASONING_PARSERS
from router.servicer import RegistryServicer, RouterServicer
from router.tokenizer import RouterTokenizer
from router.tool_parsers import TOOL_PARSERS
from router.workers import MISSED_HEARTBEATS, MembershipCollector
from rpc.auth import server_interceptors, warn_if_open
from rpc.tls import PLAINTEXT, TLSConfig, add_port, add_tls_args, tls_from_args
from tandem.log_config import configure_logging

log = logging.getLogger("tandem.router")

SERVICE_NAMES = (
    router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="HF-format model dir (tokenizer, config)")
    parser.add_argument("--served-model-name", default="", help="name clients use as `model`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (%(default)s)")
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus HTTP port on --host (0: off)"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=0, help="context length (0: the model's config.json)"
    )
    parser.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="largest top_logprobs a request may ask for (%(default)s)",
    )
    parser.add_argument(
        "--routing-policy",
        choices=sorted(POLICIES),
        default="prefix",
        help="how a request's workers are picked (prefix: most cached prompt, weighed by load)",
    )
    parser.add_argument(
        "--prefill",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a prefill server (repeatable; workers may also register themselves)",
    )
    parser.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a decode server (repeatable; workers may also register themselves)",
    )
    parser.add_argument(
        "--max-num-requests",
        type=int,
        default=1024,
        help="requests in flight; beyond it RESOURCE_EXHAUSTED (%(default)s)",
    )
    parser.add_argument(
        "--heartbeat-interval-ms",
        type=_positive_int,
        default=1000,
        help="heartbeat period told to self-registered workers; one silent for "
        f"{MISSED_HEARTBEATS} periods is dropped",
    )
    parser.add_argument(
        "--max-migrations",
        type=int,
        default=3,
        help="times one request may move to another decode server after a failure",
    )
    parser.add_argument(
        "--worker-timeout", type=float, default=600.0, help="deadline of one Prefill call (s)"
    )
    parser.add_argument(
        "--handoff-timeout",
        type=float,
        default=30.0,
        help="seconds the decode stream may take to deliver its first event after the prefill answer",
    )
    parser.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=60.0,
        help="seconds a decode stream may stay silent before the router gives up on it",
    )
    parser.add_argument(
        "--max-local-prefill-length",
        type=int,
        default=0,
        help="prefill on the decode server when the prompt's part not cached there is shorter"
        " than this many tokens (no KV handoff); 0: always on a prefill server",
    )
    parser.add_argument(
        "--stream-interval",
        type=_positive_int,
        default=1,
        help="send a choice's tokens at most every N tokens (first and last at once)",
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=TOOL_PARSERS,
        default="",
        help="how tool calls are found in chat output (vLLM's names; the model's format: "
        "hermes for Qwen2.5/Qwen3/Hermes, llama3_json for Llama 3.x, mistral for Mistral)",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='serve tool_choice "auto" (the model decides whether to call tools; needs '
        '--tool-call-parser); "required" and a named function need neither flag',
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default="",
        help="split chat output into reasoning_content and content (vLLM's names: qwen3, "
        "deepseek_r1); off by default",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY", ""),
        help="the public Router API demands metadata 'authorization: Bearer KEY' (the same key"
        " as the gateway's; env TANDEM_API_KEY)",
    )
    from tandem.log_config import LEVELS

    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default="info",
        help="least severe log level written to stderr (%(default)s)",
    )
    add_tls_args(parser)
    return parser


def config_from_args(args: argparse.Namespace, tls: TLSConfig = PLAINTEXT) -> RouterConfig:
    return RouterConfig(
        model=args.model,
        served_model_name=args.served_model_name or Path(args.model).name,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_model_len=args.max_model_len,
        routing_policy=args.routing_policy,
        prefill_addresses=tuple(args.prefill),
        decode_addresses=tuple(args.decode),
        max_num_requests=args.max_num_requests,
        heartbeat_interval_ms=args.heartbeat_interval_ms,
        max_migrations=args.max_migrations,
        worker_timeout_s=args.worker_timeout,
        handoff_timeout_s=args.handoff_timeout,
        stream_idle_timeout_s=args.stream_idle_timeout,
        tls=tls,
        api_key=args.api_key,
        max_local_prefill_length=args.max_local_prefill_length,
        stream_interval=args.stream_interval,
        max_logprobs=args.max_logprobs,
        tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        reasoning_parser=args.reasoning_parser,
    )


@dataclass
class RunningRouter:
    server: grpc.aio.Server
    engine: RouterEngine
    port: int
    health: health.aio.HealthServicer

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        await self.engine.close()


async def start_router(config: RouterConfig, metrics: RouterMetrics | None = None):
    """Build and start the server (also used in-process by tests)."""
    tokenizer = RouterTokenizer(config.model)
    metrics = metrics or RouterMetrics(config.served_model_name or Path(config.model).name)
    engine = RouterEngine(config, tokenizer, metrics)
    metrics.registry.register(MembershipCollector(engine.pool, metrics.model_name))
    metrics.registry.register(
        PrefillDecisionCollector(engine.pool.prefill_decisions, metrics.model_name)
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),  # a taken port fails at bind instead of being shared
        ],
        interceptors=server_interceptors(config.tls, config.api_key),
    )
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(engine), server)
    worker_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = add_port(server, f"{config.host}:{config.port}", config.tls)
    await server.start()
    await engine.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "event=router_ready address=%s:%d model=%s policy=%s prefill=%d decode=%d tls=%s",
        config.host, port, metrics.model_name, config.routing_policy,
        len(config.prefill_addresses), len(config.decode_addresses), config.tls.mode,
    )  # fmt: skip
    return RunningRouter(server, engine, port, health_servicer)


async def serve(config: RouterConfig) -> None:
    metrics = RouterMetrics(config.served_model_name)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    running = await start_router(config, metrics)
    warn_if_open(config.tls, "router")
    # Everything allocated so far lives as long as the process: keep it out of the cyclic GC,
    # whose collections otherwise rescan it while tokens stream; and collect the young
    # generation less often (every chunk allocates a few tracked objects: at the default 700
    # the GC took ~13% of the router's CPU at one message per token, 20,000 cut the router's
    # CPU per token by ~12% on the 2-core VM; 20,000 young objects are a few MB at most).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("event=router_stopping grace_s=%.1f", config.grace_s)
    await running.health.enter_graceful_shutdown()
    await running.stop(config.grace_s)


def run(args: argparse.Namespace, tls: TLSConfig = PLAINTEXT) -> None:
    configure_logging(args.log_level)
    config = config_from_args(args, tls)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))


def main(argv: list[str] | None = None) -> None:
    parser = add_cli_args(argparse.ArgumentParser(prog="tandem router"))
    args = parser.parse_args(argv)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")
    run(args, tls_from_args(args, parser))


if __name__ == "__main__":
    main()
