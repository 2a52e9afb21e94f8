"""What prefill and decode servers share: the gRPC server lifecycle (flags: worker/flags.py).

config -> engine -> grpc.aio.server -> servicers + health + reflection -> start -> SERVING
-> register with the router (--router) -> SIGTERM -> drain (worker/drain.py) -> stop

An engine that cannot go on (AsyncEngine.wait_dead: repeated step failures, a device error)
ends it too, without a drain: NOT_SERVING for every service name, deregister, stop, and exit
with EXIT_ENGINE_DEAD, for a supervisor (compose, Kubernetes) to start a fresh process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvtransfer.channel import CHANNEL_OPTIONS
from protos import worker_pb2
from rpc.auth import server_interceptors, warn_if_open
from rpc.tls import TLSConfig, add_port
from tandem.async_engine import AsyncEngine
from tandem.engine import LLMEngine
from tandem.engine_records import EngineDeadError
from tandem.loader.default_model import DEFAULT_MODEL_NAME
from tandem.log_config import configure_logging, quote
from worker.drain import QUIET_S, QUIET_STATIC_S, InFlightRpcs, wait_idle
from worker.flags import engine_config_from_args
from worker.load import LoadSampler, WorkerMetrics
from worker.registration import RegistryClient

log = logging.getLogger("tandem.worker")


EXIT_REFUSED = 1  # the router refused this worker's registration
EXIT_ENGINE_DEAD = 2
GIL_SWITCH_INTERVAL_S = 0.0002
# grpc turns SO_REUSEPORT on by default, under which a second server binding a taken port
# succeeds and the two split the connections
SERVER_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
# Young-generation threshold once serving: every token allocates a few short-lived containers
# (outputs, futures, coroutine frames), so at the default 700 a batch of 512 triggers several
# collections per step, each paid on whichever thread (engine or loop) holds the GIL.
GC_GEN0_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """After startup (model, engine, servicers): move everything built so far out of the
    collector's sight (gc.freeze) so full collections no longer walk the ~180k startup objects
    (torch, model, protobuf descriptors), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_event_loop(main: Awaitable[int]) -> int:
    """uvloop where installed (cheaper callbacks and futures per token), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


@dataclass
class WorkerParts:
    """What a role (prefill / decode) adds to the shared server lifecycle."""

    role: int  # worker_pb2.WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE
    num_active_handoffs: Callable[[], int]  # decode: open ledger entries; prefill: KV pushes
    close: Callable[[], Awaitable[None]]  # runs after the gRPC server stopped
    kv_address: str = ""  # decode: host:port of its KVTransfer service
    # completed KV handoffs by transport (decode: received; prefill: sent)
    num_kv_handoffs: Callable[[], Mapping[str, int]] = dict
    # decode: requests admitted on a Session stream and not ended (a session itself is not
    # counted as in-flight work: the router keeps it open while idle)
    num_session_requests: Callable[[], int] = lambda: 0


def advertised_host(args: argparse.Namespace) -> str:
    if args.advertise_host:
        return args.advertise_host
    if args.host in ("", "0.0.0.0", "::", "[::]"):
        # listening everywhere: tell peers this machine's own address (a container's or
        # pod's IP), never the wildcard
        return socket.gethostbyname(socket.gethostname())
    return args.host


def served_model_name(args: argparse.Namespace, engine: LLMEngine) -> str:
    if args.served_model_name:
        return args.served_model_name
    return DEFAULT_MODEL_NAME if args.model is None else engine.model_dir.name


async def serve(
    args: argparse.Namespace,
    tls: TLSConfig,  # its port, and its channel to --router
    service_names: list[str],
    register: Callable[[grpc.aio.Server, AsyncEngine, str], Awaitable[WorkerParts]],
) -> int:
    """Run one worker until SIGTERM (drained) or a refused registration; the exit code."""
    # The engine thread and the gRPC event loop share the GIL. Every torch call releases it,
    # and with the default 5 ms switch interval the engine thread then waits for a busy
    # event loop to hand it back, many times a step. A short interval bounds that wait.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Both ports are bound before the model loads (seconds to minutes), so that a port the
    # launcher picked cannot be taken by another socket in between; and with SO_REUSEPORT
    # off, a port that is taken fails here instead of being shared with another server.
    # Until start() the gRPC port queues connections and the health service is not there.
    in_flight = InFlightRpcs()
    # authorization first: a refused call never counts as in-flight work
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=[*server_interceptors(tls), in_flight]
    )
    role_name = service_names[0].rsplit(".", 1)[-1].lower()
    metrics_registry = None
    try:
        port = add_port(server, f"{args.host}:{args.port}", tls)
        if args.metrics_port:
            from prometheus_client import CollectorRegistry, start_http_server

            metrics_registry = CollectorRegistry()  # empty until the engine is up
            start_http_server(args.metrics_port, addr=args.host, registry=metrics_registry)
    except OSError as e:
        raise SystemExit(f"tandem {role_name}: {e}") from None
    address = f"{advertised_host(args)}:{port}"
    engine = AsyncEngine(
        LLMEngine(engine_config_from_args(args)),
        max_num_waiting=args.max_num_waiting,
        stream_interval=args.stream_interval,
    )
    model_name = served_model_name(args, engine.engine)
    parts = await register(server, engine, address)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    freeze_startup_heap()
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("event=worker_listening role=%s address=%s tls=%s", role_name, address, tls.mode)
    warn_if_open(tls, role_name)

    metrics = None if metrics_registry is None else WorkerMetrics(model_name, metrics_registry)
    load = LoadSampler(engine, parts.num_active_handoffs, metrics, parts.num_kv_handoffs)
    await load.refresh()
    load.start()
    registry = None
    if args.router:
        info = _worker_info(engine.engine, parts, address, model_name)
        registry = RegistryClient(args.router, info, lambda: load.latest, tls)
        registry.start()

    force = asyncio.Event()  # a second signal: stop without waiting for in-flight work
    exit_code = await _wait_for_stop(registry, force, engine)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if exit_code == EXIT_ENGINE_DEAD and registry is not None:
        await registry.deregister()  # the router stops sending work at once (best effort)
    if exit_code == 0:
        await _drain(args, address, engine, in_flight, parts, registry, force)
    # drained: this only ends KVEvents / health streams; after a drain that timed out it
    # cuts what still runs (the router fails those requests over)
    t_stop = time.monotonic()
    await server.stop(grace=1.0)
    await parts.close()
    await load.close()
    if registry is not None:
        await registry.close()
    t_engine = time.monotonic()
    engine.shutdown()  # at tensor-parallel size > 1 this also stops the other ranks
    log.info(
        "event=worker_stopped address=%s server_stop_s=%.2f engine_stop_s=%.2f",
        address, t_engine - t_stop, time.monotonic() - t_engine,
    )  # fmt: skip
    return exit_code


def _worker_info(engine: LLMEngine, parts: WorkerParts, address: str, model_name: str):
    return worker_pb2.WorkerInfo(
        role=parts.role,
        address=address,
        kv_address=parts.kv_address,
        model=model_name,
        block_size=engine.cfg.block_size,
        num_blocks=engine.block_manager.num_blocks,
        max_num_seqs=engine.cfg.max_num_seqs,
    )


async def _wait_for_stop(
    registry: RegistryClient | None, force: asyncio.Event, engine: AsyncEngine
) -> int:
    """Until SIGTERM/SIGINT (0: drain), the router refused this worker (EXIT_REFUSED) or the
    engine died (EXIT_ENGINE_DEAD)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: force.set() if stop.is_set() else stop.set())
    dead = asyncio.ensure_future(engine.wait_dead())
    waits = [asyncio.ensure_future(stop.wait()), dead]
    if registry is not None:
        waits.append(asyncio.ensure_future(registry.refused.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if dead.done() and not dead.cancelled():
        log.critical(
            "event=engine_dead error=%s status=NOT_SERVING exiting=True", quote(repr(dead.result()))
        )
        return EXIT_ENGINE_DEAD
    return 0 if stop.is_set() else EXIT_REFUSED


async def _drain(args, address, engine, in_flight, parts, registry, force) -> None:
    async def engine_requests() -> int:
        try:
            s = await engine.call(engine.engine.stats)
        except EngineDeadError:
            return 0  # nothing can finish; do not wait for it
        return s.num_running + s.num_waiting

    async def busy() -> int:
        n = in_flight.count + parts.num_session_requests() + parts.num_active_handoffs()
        return n + await engine_requests()

    t0 = time.monotonic()
    deregistered = registry is not None and await registry.deregister()
    log.info(
        "event=drain_start address=%s rpcs=%d engine_requests=%d handoffs=%d timeout_s=%.0f",
        address, in_flight.count, await engine_requests(), parts.num_active_handoffs(),
        args.drain_timeout,
    )  # fmt: skip
    quiet = QUIET_S if deregistered else QUIET_STATIC_S
    remaining = await wait_idle(busy, args.drain_timeout, quiet, force)
    log.info(
        "event=drain_done address=%s waited_s=%.2f remaining=%d deregistered=%s",
        address, time.monotonic() - t0, remaining, deregistered,
    )  # fmt: skip


def run_worker(args, tls: TLSConfig, service_names, register) -> None:
    """The `tandem prefill|decode` entry point; exits with serve's code."""
    configure_logging(args.log_level)
    raise SystemExit(run_event_loop(serve(args, tls, service_names, register)))
