"""`tandem serve`: the whole stack on this host (prefill and decode servers, routers,
gateways), started in that order, each waited for until healthy, then supervised
(tandem_cli/supervisor.py: a child that exits is restarted on its own host:port) until Ctrl-C
or SIGTERM stops them all.

The internal gRPC plane (router, prefill, decode) listens on 127.0.0.1 unless
--internal-host says otherwise; only the gateways listen on --host. With no --tls-* files it
runs mutual TLS with a throw-away CA and one certificate per role (rpc/pki.py), written to a
private temporary directory that is removed at exit; --internal-plaintext runs it in plaintext
with a random shared token instead (development only)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field

from gateway.pool import gateway_pool
from rpc.procs import free_port, wait_grpc_healthy, wait_http_healthy
from rpc.tls import ENV as TLS_ENV
from rpc.tls import TLSConfig, add_tls_args, tls_argv
from tandem_cli.supervisor import Child, StopSignal, Supervisor, metrics_cleanup

log = logging.getLogger("tandem.serve")

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
# The gateway's admission flags (gateway/server.py, "overload and deadlines"), spelled out:
# importing the gateway here would load FastAPI into every `tandem` process. None: its default.
_GATEWAY_FLAGS = [
    ("max_concurrent_requests", int, "generation requests in flight, per gateway process"),
    ("max_queued_requests", int, "requests waiting for a slot, per gateway (0: refuse at once)"),
    ("queue_timeout_s", float, "longest wait for a slot in seconds"),
    ("request_timeout_s", float, "deadline of one generation call to the router, in seconds"),
    ("router_timeout_s", float, "deadline of other router calls, in seconds"),
]
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}
API_KEY_ENV = "TANDEM_API_KEY"


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


@dataclass
class InternalPlane:
    """How the children authenticate each other, and how serve's own health checks reach them."""

    mode: str  # "mtls": serve's own certificates | "given": the --tls-* flags | "plaintext"
    health_tls: TLSConfig
    env: dict[str, str]  # every child's environment (the API key and token ride here)
    cert_dir: str = ""  # serve's certificates (mode "mtls"); removed at exit
    given_argv: list[str] = field(default_factory=list)

    def argv(self, role: str) -> list[str]:
        if self.mode != "mtls":
            return list(self.given_argv)
        d = self.cert_dir
        return [
            *("--tls-certfile", os.path.join(d, f"{role}.pem")),
            *("--tls-keyfile", os.path.join(d, f"{role}-key.pem")),
            *("--tls-ca-certs", os.path.join(d, "ca.pem"), "--tls-require-client-cert"),
        ]

    def describe(self) -> str:
        if self.mode == "mtls":
            return f"internal mTLS, gRPC client credentials in {self.cert_dir}"
        if self.mode == "plaintext":
            return "internal plaintext + shared token (development only)"
        return f"internal {self.health_tls.mode}"


def _internal_plane(args: argparse.Namespace, tls: TLSConfig, hosts: tuple[str, ...]):
    token_file = getattr(args, "internal_token_file", "")  # the lead's flag, when present
    given = any((args.tls_certfile, args.tls_keyfile, args.tls_ca_certs, token_file))
    if given and args.internal_plaintext:
        raise SystemExit("--internal-plaintext and the --tls-* files exclude each other")
    env = dict(os.environ)
    if args.api_key:  # the gateways and the routers demand the same key (env: not in `ps`)
        env[API_KEY_ENV] = args.api_key
    if given:
        return InternalPlane("given", tls, env, given_argv=tls_argv(args))
    if args.internal_plaintext:
        token = os.environ.get(TLS_ENV["internal_token"]) or secrets.token_urlsafe(32)
        env[TLS_ENV["internal_token"]] = token
        log.warning(
            "event=internal_plaintext mode=development detail=%r",
            "internal gRPC runs in plaintext with a shared token: anyone who can read the "
            "traffic can call it; drop --internal-plaintext for mutual TLS",
        )
        return InternalPlane("plaintext", TLSConfig(token=token), env)
    from rpc.pki import cert_paths, write_certs

    cert_dir = tempfile.mkdtemp(prefix="tandem-certs-")  # 0700: only this user reads the keys
    os.chmod(cert_dir, 0o700)
    try:
        paths = write_certs(cert_dir, hosts)
        cert, key = cert_paths(cert_dir, "client")
        health = TLSConfig.from_files(str(cert), str(key), str(paths["ca"]))
    except BaseException:
        shutil.rmtree(cert_dir, ignore_errors=True)
        raise
    return InternalPlane("mtls", health, env, cert_dir=cert_dir)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
    )
    # exits and restarts are always worth a line, whatever the children's level
    log.setLevel(min(logging.INFO, logging.getLogger().level))


def serve(args: argparse.Namespace, tls: TLSConfig) -> None:
    """Start gateway + router + prefill x N + decode x M on this host; Ctrl-C stops them all."""
    from tandem.loader.default_model import DEFAULT_MODEL_NAME, resolve_model_dir

    if args.gateways < 1 or args.routers < 1:
        raise SystemExit("--gateways and --routers must be >= 1")
    if args.mode == "aggregated":
        args.prefill = 0
    elif args.mode == "disaggregated" and args.prefill == 0:
        raise SystemExit("--mode disaggregated needs --prefill >= 1")
    _setup_logging(args.log_level)
    model_dir = resolve_model_dir(args.model)  # converts the default GGUF once, here
    served = args.served_model_name or (
        DEFAULT_MODEL_NAME if args.model is None else model_dir.name
    )
    host, bind = args.host, args.internal_host
    dial = _WILDCARDS.get(bind, bind)  # where serve and the children reach internal servers
    hosts = tuple(dict.fromkeys(("localhost", "127.0.0.1", dial)))
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
    common = ["--model", str(model_dir), "--log-level", args.log_level]

    shares = _memory_shares(args)
    stop = StopSignal()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    sup, plane, metrics_dir = Supervisor(), None, None
    try:
        plane = _internal_plane(args, tls, hosts)
        workers = []
        for role, count in (("decode", args.decode), ("prefill", args.prefill)):
            for i in range(count):
                port = free_port(bind)
                cmd = [*py, role, "--host", bind, "--port", str(port), *common, *engine_flags]
                cmd += ["--kv-transport", args.kv_transport, *plane.argv(role)]
                if role == "decode":
                    cmd += ["--stream-interval", str(args.stream_interval)]
                cmd += ["--served-model-name", served]  # the label of the workers' metrics
                if shares[role] is not None:
                    cmd += ["--gpu-memory-utilization", str(shares[role])]
                workers.append(sup.start(Child(role, i, f"{dial}:{port}", cmd, plane.env)))
        for w in workers:
            wait_grpc_healthy(w.address, w.proc, args.startup_timeout, plane.health_tls)
        routers = []  # gateway i talks to router i % len(routers)
        for i in range(args.routers):
            port = args.router_port + i if args.router_port else free_port(bind)
            cmd = [*py, "router", "--host", bind, "--port", str(port), *common]
            cmd += ["--served-model-name", served, "--routing-policy", args.routing_policy]
            cmd += ["--max-local-prefill-length", str(args.max_local_prefill_length)]
            cmd += ["--stream-interval", str(args.stream_interval), *plane.argv("router")]
            if args.max_model_len:
                cmd += ["--max-model-len", str(args.max_model_len)]
            for w in workers:
                cmd += [f"--{w.role}", w.address]
            routers.append(sup.start(Child("router", i, f"{dial}:{port}", cmd, plane.env)))
        for r in routers:
            wait_grpc_healthy(r.address, r.proc, args.startup_timeout, plane.health_tls)
        # one port (SO_REUSEPORT), one /metrics over all of them
        gw_flags, gw_env, metrics_dir = gateway_pool(args.gateways)
        gw_env = {**(gw_env or {}), **plane.env}
        for name, _, _ in _GATEWAY_FLAGS:
            if getattr(args, name) is not None:
                gw_flags = [*gw_flags, f"--{name.replace('_', '-')}", str(getattr(args, name))]
        for i in range(args.gateways):
            cmd = [*py, "gateway", "--host", host, "--port", str(args.port)]
            cmd += ["--router", routers[i % len(routers)].address, "--log-level", args.log_level]
            cmd += [*plane.argv("gateway"), *gw_flags]
            on_exit = metrics_cleanup(metrics_dir) if metrics_dir else None
            gateway = sup.start(Child("gateway", i, f"{host}:{args.port}", cmd, gw_env, on_exit))
        # The port answers once one gateway listens; one still starting gets no connections.
        wait_http_healthy(f"http://{host}:{args.port}/health", gateway.proc, args.startup_timeout)
        router_list = ", ".join(r.address for r in routers)
        print(
            f"tandem is serving {served} at http://{host}:{args.port}/v1 ({args.gateways} "
            f"gateway(s); router grpc {router_list}; {args.prefill} prefill, {args.decode} "
            f"decode; {plane.describe()}). Ctrl-C stops.",
            flush=True,
        )
        stop.raising = False
        sup.run(lambda: bool(stop.signum))
    except KeyboardInterrupt:
        pass
    finally:
        stop.raising = False  # a second Ctrl-C must not cut the shutdown short
        sup.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if plane is not None and plane.cert_dir:
            shutil.rmtree(plane.cert_dir, ignore_errors=True)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF directory or .gguf (default: SmolLM2-135M-Instruct)",
    )
    p.epilog = (
        "Each child it starts, and starts again after it exited, prints one line to stdout: "
        "'event=child_started role=ROLE index=I address=HOST:PORT pid=PID restarts=N' (ROLE: "
        "decode, prefill, router, gateway); exits and restarts are logged (logger "
        "tandem.serve). A child that exits is restarted on the same address, after 1 s "
        "doubling to 30 s while it keeps failing."
    )
    p.add_argument("--host", default="127.0.0.1", help="address the gateways (HTTP) listen on")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    p.add_argument(
        "--internal-host",
        default="127.0.0.1",
        help="address the router, prefill and decode servers (gRPC) listen on",
    )
    p.add_argument(
        "--router-port", type=int, default=0, help="router gRPC port (default: a free one)"
    )
    p.add_argument(
        "--internal-plaintext",
        action="store_true",
        help="development only: internal gRPC in plaintext with a random shared token (env "
        "TANDEM_INTERNAL_TOKEN if set) instead of mutual TLS with throw-away certificates",
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
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help="gateways and routers demand it (HTTP Authorization: Bearer, gRPC metadata "
        "authorization: Bearer) (env TANDEM_API_KEY)",
    )
    g = p.add_argument_group("gateway admission", "passed to every gateway (default: its own)")
    for name, kind, text in _GATEWAY_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
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
