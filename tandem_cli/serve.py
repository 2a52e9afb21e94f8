"""`tandem serve`: the supervisor that starts the whole stack on this host (prefill and decode
servers, routers, gateways), waits until each is healthy, and stops them all together."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

from gateway.pool import gateway_pool
from rpc.procs import free_port, wait_grpc_healthy, wait_http_healthy
from rpc.tls import TLSConfig, add_tls_args, tls_argv

_ENGINE_FLAGS = [
    "dtype",
    "device",
    "load_format",
    "kernel_backend",
    "block_size",
    "num_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "seed",
    "tensor_parallel_size",
]


def _memory_shares(args: argparse.Namespace) -> dict[str, float | None]:
    """--gpu-memory-utilization per role. Aggregated: the decode servers take the default (0.9)
    each. Disaggregated on GPUs they share: each server's fraction of the GPU, prefill servers
    0.3 and decode servers 0.6 in all unless set (prefill KV only lives until it is pushed)."""
    decode, prefill = args.gpu_memory_utilization, args.prefill_gpu_memory_utilization
    if args.prefill == 0 or args.device == "cpu":
        return {"decode": decode, "prefill": prefill}
    return {
        "decode": decode if decode is not None else round(0.6 / args.decode, 3),
        "prefill": prefill if prefill is not None else round(0.3 / args.prefill, 3),
    }


def serve(args: argparse.Namespace, tls: TLSConfig) -> None:
    """Start gateway + router + prefill x N + decode x M on this host; Ctrl-C stops them all."""
    from tandem.loader.default_model import DEFAULT_MODEL_NAME, resolve_model_dir

    if args.gateways < 1 or args.routers < 1:
        raise SystemExit("--gateways and --routers must be >= 1")
    if args.mode == "aggregated":
        args.prefill = 0
    elif args.mode == "disaggregated" and args.prefill == 0:
        raise SystemExit("--mode disaggregated needs --prefill >= 1")
    model_dir = resolve_model_dir(args.model)  # converts the default GGUF once, here
    served = args.served_model_name or (
        DEFAULT_MODEL_NAME if args.model is None else model_dir.name
    )
    host = args.host
    py = [sys.executable, "-m", "tandem_cli.main"]
    engine_flags = []
    for name in _ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            engine_flags += [f"--{name.replace('_', '-')}", str(value)]
    if not args.enable_prefix_caching:
        engine_flags.append("--no-enable-prefix-caching")
    if args.async_scheduling is not None:
        engine_flags.append(
            "--async-scheduling" if args.async_scheduling else "--no-async-scheduling"
        )
    common = ["--model", str(model_dir), "--log-level", args.log_level, *tls_argv(args)]
    worker_flags = ["--kv-transport", args.kv_transport]

    shares = _memory_shares(args)
    procs: list[subprocess.Popen] = []
    metrics_dir = None
    try:
        workers = []
        for role, count in (("decode", args.decode), ("prefill", args.prefill)):
            for _ in range(count):
                port = free_port(host)
                cmd = [*py, role, "--host", host, "--port", str(port), *common, *engine_flags]
                cmd += worker_flags
                if role == "decode":
                    cmd += ["--stream-interval", str(args.stream_interval)]
                cmd += ["--served-model-name", served]  # the label of the workers' metrics
                if shares[role] is not None:
                    cmd += ["--gpu-memory-utilization", str(shares[role])]
                procs.append(subprocess.Popen(cmd))
                workers.append((role, f"{host}:{port}", procs[-1]))
        for _, address, proc in workers:
            wait_grpc_healthy(address, proc, args.startup_timeout, tls)
        routers = []  # addresses; gateway i talks to router i % len(routers)
        for i in range(args.routers):
            router_port = args.router_port + i if args.router_port else free_port(host)
            router_cmd = [*py, "router", "--host", host, "--port", str(router_port), *common]
            router_cmd += ["--served-model-name", served, "--routing-policy", args.routing_policy]
            router_cmd += ["--max-local-prefill-length", str(args.max_local_prefill_length)]
            router_cmd += ["--stream-interval", str(args.stream_interval)]
            if args.max_model_len:
                router_cmd += ["--max-model-len", str(args.max_model_len)]
            for role, address, _ in workers:
                router_cmd += [f"--{role}", address]
            procs.append(subprocess.Popen(router_cmd))
            routers.append((f"{host}:{router_port}", procs[-1]))
        for address, proc in routers:
            wait_grpc_healthy(address, proc, args.startup_timeout, tls)
        # one port (SO_REUSEPORT), one /metrics over all of them
        gw_flags, gw_env, metrics_dir = gateway_pool(args.gateways)
        for i in range(args.gateways):
            gw_cmd = [*py, "gateway", "--host", host, "--port", str(args.port)]
            gw_cmd += ["--router", routers[i % len(routers)][0]]
            gw_cmd += ["--log-level", args.log_level, *tls_argv(args), *gw_flags]
            if args.api_key:
                gw_cmd += ["--api-key", args.api_key]
            procs.append(subprocess.Popen(gw_cmd, env=gw_env))
        # The port answers once one gateway listens; one still starting gets no connections.
        wait_http_healthy(f"http://{host}:{args.port}/health", procs[-1], args.startup_timeout)
        router_list = ", ".join(address for address, _ in routers)
        print(
            f"tandem is serving {served} at http://{host}:{args.port}/v1 ({args.gateways} "
            f"gateway(s); router grpc {router_list}; {args.prefill} prefill, {args.decode} "
            "decode). Ctrl-C stops.",
            flush=True,
        )
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a tandem process exited; stopping the others")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF directory or .gguf (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    p.add_argument(
        "--router-port", type=int, default=0, help="router gRPC port (default: a free one)"
    )
    p.add_argument(
        "--prefill", type=int, default=1, help="prefill servers (0: decode servers prefill locally)"
    )
    p.add_argument("--decode", type=int, default=1, help="decode servers")
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateway processes sharing --port (SO_REUSEPORT; vLLM's --api-server-count): "
        "the HTTP/SSE work of many streams on several cores; admission limits are per process",
    )
    p.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router processes (gateway i uses router i %% N): tokenizing, detokenizing and "
        "the per-token gRPC streams on several cores; with --router-port P they take P, P+1, ...",
    )
    p.add_argument(
        "--mode",
        choices=["aggregated", "disaggregated"],
        default=None,
        help="aggregated: decode servers prefill locally (same as --prefill 0); "
        "disaggregated: --prefill servers prefill and push KV to the decode servers",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of the GPU each decode server may use (default 0.9 aggregated, "
        "0.6 shared among the decode servers when prefill servers share the GPU)",
    )
    p.add_argument(
        "--prefill-gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of the GPU each prefill server may use (default 0.3 shared among them)",
    )
    p.add_argument(
        "--routing-policy", default="prefix", choices=["prefix", "least_load", "round_robin"]
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument(
        "--max-local-prefill-length",
        type=int,
        default=0,
        help="router: prefill on the decode server when the prompt's part not cached there is"
        " shorter than this many tokens (conditional disaggregation; 0: always remote)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="decode servers and router: send a request's tokens N at a time (first and last"
        " at once); fewer messages per step at large batches, coarser streaming",
    )
    p.add_argument(
        "--kv-transport",
        default="auto",
        # kvtransfer.select.CHOICES, spelled out: this module must not import torch
        choices=["auto", "grpc", "shm", "cuda_ipc"],
        help="KV handoff transport of the prefill and decode servers (auto: cuda_ipc on a"
        " shared GPU, shm between CPU servers, else grpc)",
    )
    p.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"))
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="workers launch each step before the previous one's tokens reach the host"
        " (default: on for CUDA at tensor-parallel size 1)",
    )
    for name in _ENGINE_FLAGS:
        kind = str if name in ("dtype", "device", "load_format", "kernel_backend") else int
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    add_tls_args(p)  # passed to every process it starts
