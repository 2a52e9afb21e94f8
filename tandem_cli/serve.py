"""`tandem serve`: the whole stack on this host (prefill and decode servers, routers,
gateways), started in that order, each waited for until healthy, then supervised
(tandem_cli/supervisor.py: a child that exits is restarted on its own host:port) until Ctrl-C
or SIGTERM stops them all.

The internal gRPC plane (router, prefill, decode) listens on 127.0.0.1 unless
--internal-host says otherwise; only the gateways listen on --host. With no --tls-* files it
runs mutual TLS with a throw-away CA and one certificate per role (rpc/pki.py), written to a
private temporary directory that is removed at exit; --internal-plaintext runs it in plaintext
with a random shared token instead (development only).

Before anything is loaded it checks that its fixed ports (--port, --router-port) are free
(tandem_cli/startup.py); once every server is healthy it prints a banner: version, model,
device and dtype, the decode servers' KV cache in tokens, the URLs. Every router and worker
serves /metrics on a port of the internal host, chosen once, which the gateways scrape."""

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
from rpc.pki import cert_paths, write_certs
from rpc.procs import free_port, wait_grpc_healthy, wait_http_healthy
from rpc.tls import ENV as TLS_ENV
from rpc.tls import TLSConfig, tls_argv
from tandem.log_config import configure_logging
from tandem_cli import startup
from tandem_cli.serve_flags import (  # noqa: F401 - add_serve_args: `tandem serve`'s flags
    API_KEY_ENV,
    ENGINE_FLAGS,
    GATEWAY_FLAGS,
    WORKER_DEFAULTS,
    add_serve_args,
)
from tandem_cli.supervisor import Child, StopSignal, Supervisor, metrics_cleanup

log = logging.getLogger("tandem.serve")

_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


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
    # Decode.Stats admits the router role only (rpc/auth.py): the banner asks with this
    stats_tls: TLSConfig | None = None

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

    def client_credentials(self) -> str:
        """What a gRPC client of the router needs, for the banner."""
        if self.mode == "mtls":
            cert, key = cert_paths(self.cert_dir, "client")
            ca = os.path.join(self.cert_dir, "ca.pem")
            return f"client certificate {cert}, key {key}, CA {ca}"
        if self.mode == "plaintext":
            return f"shared token in env {TLS_ENV['internal_token']} of serve's children"
        return "your --tls-* files"


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
    cert_dir = tempfile.mkdtemp(prefix="tandem-certs-")  # 0700: only this user reads the keys
    os.chmod(cert_dir, 0o700)
    try:
        paths = write_certs(cert_dir, hosts)
        cert, key = cert_paths(cert_dir, "client")
        health = TLSConfig.from_files(str(cert), str(key), str(paths["ca"]))
        cert, key = cert_paths(cert_dir, "router")
        stats = TLSConfig.from_files(str(cert), str(key), str(paths["ca"]))
    except BaseException:
        shutil.rmtree(cert_dir, ignore_errors=True)
        raise
    return InternalPlane("mtls", health, env, cert_dir=cert_dir, stats_tls=stats)


def _setup_logging(level: str) -> None:
    configure_logging(level)
    # exits and restarts are always worth a line, whatever the children's level
    log.setLevel(min(logging.INFO, logging.getLogger().level))


class _Ports:
    """Free ports on the internal host, each handed out once (free_port alone may return a
    port twice) and never one of serve's fixed ones."""

    def __init__(self, host: str, taken: set[int]) -> None:
        self.host, self.taken = host, set(taken)

    def take(self) -> int:
        while (port := free_port(self.host)) in self.taken:
            pass
        self.taken.add(port)
        return port


def _engine_argv(args: argparse.Namespace) -> list[str]:
    """The flags every prefill and decode server gets; unset ones keep the worker's default."""
    argv = []
    for name, _, _, _ in ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if not args.enable_prefix_caching:
        argv.append("--no-enable-prefix-caching")
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if args.async_scheduling is not None:
        argv.append("--async-scheduling" if args.async_scheduling else "--no-async-scheduling")
    return [*argv, "--max-logprobs", str(args.max_logprobs)]


def _tool_argv(args: argparse.Namespace) -> list[str]:
    """The router's tool-calling and reasoning flags, as given to serve."""
    argv = []
    if args.tool_call_parser:
        argv += ["--tool-call-parser", args.tool_call_parser]
    if args.enable_auto_tool_choice:
        argv.append("--enable-auto-tool-choice")
    if args.reasoning_parser:
        argv += ["--reasoning-parser", args.reasoning_parser]
    return argv


def serve(args: argparse.Namespace, tls: TLSConfig) -> None:
    """Start gateway + router + prefill x N + decode x M on this host; Ctrl-C stops them all."""
    startup.check_ports(args)  # before anything is loaded or started
    _setup_logging(args.log_level)
    from tandem.loader.default_model import DEFAULT_MODEL_NAME, resolve_model_dir

    model_dir = resolve_model_dir(args.model)  # converts the default GGUF once, here
    served = args.served_model_name or model_dir.name
    if args.model is None:
        served = args.served_model_name or DEFAULT_MODEL_NAME
    elif args.model.endswith(".gguf") and not args.served_model_name:
        served = os.path.basename(args.model)[: -len(".gguf")]  # not the cache dir's hash
    host, bind = args.host, args.internal_host
    dial = _WILDCARDS.get(bind, bind)  # where serve and the children reach internal servers
    hosts = tuple(dict.fromkeys(("localhost", "127.0.0.1", dial)))
    py = [sys.executable, "-m", "tandem_cli.main"]
    engine_flags = _engine_argv(args)
    common = ["--model", str(model_dir), "--log-level", args.log_level]
    fixed = {args.port, *(args.router_port + i for i in range(args.routers) if args.router_port)}
    ports = _Ports(bind, fixed)
    # Every router and worker serves /metrics on its own port (chosen once: a restarted
    # child keeps it); the gateways scrape them into the one /metrics on --port.
    scrape = []

    shares = _memory_shares(args)
    stop = StopSignal()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    sup, plane, metrics_dir = Supervisor(), None, None
    try:
        plane = _internal_plane(args, tls, hosts)
        workers = []
        for role, count in (("decode", args.decode), ("prefill", args.prefill)):
            for i in range(count):
                port, metrics_port = ports.take(), ports.take()
                cmd = [*py, role, "--host", bind, "--port", str(port), *common, *engine_flags]
                cmd += ["--kv-transport", args.kv_transport, *plane.argv(role)]
                cmd += ["--metrics-port", str(metrics_port)]
                if role == "decode":
                    cmd += ["--stream-interval", str(args.stream_interval)]
                cmd += ["--served-model-name", served]  # the label of the workers' metrics
                if shares[role] is not None:
                    cmd += ["--gpu-memory-utilization", str(shares[role])]
                workers.append(sup.start(Child(role, i, f"{dial}:{port}", cmd, plane.env)))
                scrape.append(f"{role}=http://{startup.url_host(dial)}:{metrics_port}/metrics")
        for w in workers:
            wait_grpc_healthy(w.address, w.proc, args.startup_timeout, plane.health_tls)
        routers = []  # gateway i talks to router i % len(routers)
        for i in range(args.routers):
            port = args.router_port + i if args.router_port else ports.take()
            metrics_port = ports.take()
            cmd = [*py, "router", "--host", bind, "--port", str(port), *common]
            cmd += ["--served-model-name", served, "--routing-policy", args.routing_policy]
            cmd += ["--max-local-prefill-length", str(args.max_local_prefill_length)]
            cmd += ["--stream-interval", str(args.stream_interval), *plane.argv("router")]
            cmd += ["--max-logprobs", str(args.max_logprobs)]
            cmd += _tool_argv(args)
            cmd += ["--metrics-port", str(metrics_port)]
            if args.max_model_len:
                cmd += ["--max-model-len", str(args.max_model_len)]
            for w in workers:
                cmd += [f"--{w.role}", w.address]
            routers.append(sup.start(Child("router", i, f"{dial}:{port}", cmd, plane.env)))
            scrape.append(f"router=http://{startup.url_host(dial)}:{metrics_port}/metrics")
        for r in routers:
            wait_grpc_healthy(r.address, r.proc, args.startup_timeout, plane.health_tls)
        # one port (SO_REUSEPORT), one /metrics over all of them
        gw_flags, gw_env, metrics_dir = gateway_pool(args.gateways)
        gw_env = {**(gw_env or {}), **plane.env}
        for name, _, _ in GATEWAY_FLAGS:
            if getattr(args, name) is not None:
                gw_flags = [*gw_flags, f"--{name.replace('_', '-')}", str(getattr(args, name))]
        gw_flags = [*gw_flags, "--max-logprobs", str(args.max_logprobs)]
        for source in scrape:
            gw_flags = [*gw_flags, "--scrape-metrics", source]
        for i in range(args.gateways):
            cmd = [*py, "gateway", "--host", host, "--port", str(args.port)]
            cmd += ["--router", routers[i % len(routers)].address, "--log-level", args.log_level]
            cmd += [*plane.argv("gateway"), *gw_flags]
            on_exit = metrics_cleanup(metrics_dir) if metrics_dir else None
            gateway = sup.start(Child("gateway", i, f"{host}:{args.port}", cmd, gw_env, on_exit))
        # The port answers once one gateway listens; one still starting gets no connections.
        base = f"http://{startup.url_host(host)}:{args.port}"
        wait_http_healthy(f"{base}/health", gateway.proc, args.startup_timeout)
        banner = _banner(args, plane, served, model_dir, workers, routers, base)
        print("\n".join(banner.lines()), flush=True)
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


def _banner(args, plane: InternalPlane, served: str, model_dir, workers, routers, base: str):
    """Read back what the stack runs with (the decode servers' KV cache, the router's
    context length) for the startup banner."""
    decode = [
        startup.decode_capacity(w.address, plane.stats_tls or plane.health_tls)
        for w in workers
        if w.role == "decode"
    ]
    max_model_len = startup.router_max_model_len(
        routers[0].address, plane.health_tls, args.api_key or ""
    ) or (args.max_model_len or startup.model_config_len(model_dir))
    device, dtype = startup.device_and_dtype(args.device, args.dtype)
    return startup.Banner(
        served=served,
        model=str(model_dir),
        base_url=f"{base}/v1",
        metrics_url=f"{base}/metrics",
        routers=[r.address for r in routers],
        num_gateways=args.gateways,
        num_prefill=args.prefill,
        num_decode=args.decode,
        internal=plane.describe(),
        client_credentials=plane.client_credentials(),
        device=device,
        dtype=dtype,
        tensor_parallel_size=args.tensor_parallel_size or WORKER_DEFAULTS["tensor_parallel_size"],
        decode=decode,
        max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs or WORKER_DEFAULTS["max_num_seqs"],
    )
