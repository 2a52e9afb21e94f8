"""`tandem gateway`: OpenAI-compatible HTTP in front of the router (FastAPI + uvicorn/uvloop).

config -> app -> uvicorn (SIGTERM/SIGINT: graceful, in-flight streams get the grace period).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.federation import parse_source
from rpc.tls import PLAINTEXT, TLSConfig, add_tls_args, tls_from_args
from tandem.log_config import configure_logging

log = logging.getLogger("tandem.gateway")


def _flag_group(parser, flags, title: str, description: str):
    """One flag per GatewayConfig field, defaulting to the field's default."""
    group, defaults = parser.add_argument_group(title, description), GatewayConfig()
    for name, kind, text in flags:
        group.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
            help=f"{text} (%(default)s)",
        )  # fmt: skip
    return group


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (%(default)s)")
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY", ""),
        help="require `Authorization: Bearer KEY` on every route but /health, /ready, /live "
        "and send it to the router (default: env TANDEM_API_KEY; empty: no auth)",
    )
    parser.add_argument("--served-model-name", default="", help="model name clients use")
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=float,
        default=5.0,
        help="seconds in-flight requests get after SIGTERM before they are cut (%(default)s)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT so several gateway processes share --port (the kernel "
        "spreads connections among them); set PROMETHEUS_MULTIPROC_DIR to the same empty "
        "directory for all of them and /metrics sums their counters",
    )
    parser.add_argument(
        "--scrape-metrics",
        action="append",
        default=[],
        type=_scrape_source,
        metavar="[COMPONENT=]URL",
        help="another component's Prometheus endpoint (a router's or worker's --metrics-port) "
        "to serve with the gateway's own on /metrics, its samples labelled source=HOST:PORT "
        "and component=COMPONENT; repeatable; a source that does not answer within 1 s is "
        "left out and counted in tandem:metrics_scrape_errors_total",
    )
    from tandem.log_config import LEVELS

    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default="info",
        help="least severe log level written to stderr (%(default)s)",
    )

    lim = _flag_group(
        parser, _LIMIT_FLAGS, "request limits",
        "checked before anything reaches the router; 400 (413 for the body) with the field "
        "in `param`",
    )  # fmt: skip
    lim.add_argument(
        "--reject-unknown-fields",
        action="store_true",
        help="400 for body fields the gateway does not know (default: ignore them, as vLLM)",
    )
    _flag_group(
        parser, _OVERLOAD_FLAGS, "overload and deadlines",
        "past the running bound requests wait in a FIFO queue; past the queue bound or the "
        "wait timeout they get 429 with Retry-After",
    )  # fmt: skip
    add_tls_args(parser)
    return parser


def _scrape_source(value: str) -> str:
    try:
        parse_source(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


_LIMIT_FLAGS = [
    ("max_body_bytes", int, "largest HTTP request body in bytes"),
    ("max_n", int, "largest `n` (choices per prompt)"),
    ("max_prompts", int, "most prompts in one completions request"),
    ("max_tokens_limit", int, "largest max_tokens / max_completion_tokens"),
    ("max_stop_sequences", int, "most stop strings"),
    ("max_stop_len", int, "longest stop string, in characters"),
    ("max_stop_token_ids", int, "most stop_token_ids"),
    ("max_logprobs", int, "largest completions `logprobs` / chat `top_logprobs`"),
    ("max_prompt_chars", int, "longest prompt (or chat, summed) in characters, before tokenizing"),
    ("max_messages", int, "most chat messages"),
    ("max_logit_bias", int, "most logit_bias entries"),
]
_OVERLOAD_FLAGS = [
    ("max_concurrent_requests", int, "generation requests in flight"),
    ("max_queued_requests", int, "requests waiting for a slot (0: refuse at once)"),
    ("queue_timeout_s", float, "longest wait for a slot in seconds"),
    ("request_timeout_s", float, "deadline of one generation call to the router, in seconds"),
    ("router_timeout_s", float, "deadline of other router calls, in seconds"),
]


def config_from_args(args: argparse.Namespace, tls: TLSConfig = PLAINTEXT) -> GatewayConfig:
    names = [n for n, _, _ in _LIMIT_FLAGS + _OVERLOAD_FLAGS]
    return GatewayConfig(
        router=args.router,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        reject_unknown_fields=args.reject_unknown_fields,
        scrape_metrics=tuple(args.scrape_metrics),
        tls=tls,
        **{n: getattr(args, n) for n in names},
    )


class _Server(uvicorn.Server):
    # uvicorn re-raises SIGTERM after its graceful shutdown (exit status -15); a drained
    # gateway exits 0 instead, like the router.
    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:  # uvicorn's own "running on" line is quiet: this one says it
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    log.info("event=gateway_listening address=http://%s:%d", host, port)


def make_server(config: GatewayConfig, grace_s: float = 5.0):
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uv_config = uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        loop=loop,
        # no dictConfig of uvicorn's own: its lines go through tandem.log_config's format, and
        # its loggers' levels (access log: per request, quiet unless debug) are set there
        log_config=None,
        log_level=None,
        timeout_graceful_shutdown=grace_s,
    )
    return _Server(uv_config)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT: every gateway process binds its own and
    the kernel hands each new connection to one of them."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def run(args: argparse.Namespace, tls: TLSConfig = PLAINTEXT) -> None:
    configure_logging(args.log_level)
    config = config_from_args(args, tls)
    log.info(
        "event=gateway_starting address=%s:%d router=%s router_tls=%s reuse_port=%s",
        config.host, config.port, config.router, tls.mode, args.reuse_port,
    )  # fmt: skip
    server = make_server(config, args.timeout_graceful_shutdown)
    server.run(sockets=[reuse_port_socket(config.host, config.port)] if args.reuse_port else None)


def main(argv: list[str] | None = None) -> None:
    parser = add_cli_args(argparse.ArgumentParser(prog="tandem gateway"))
    args = parser.parse_args(argv)
    run(args, tls_from_args(args, parser, server=False))


if __name__ == "__main__":
    main()
