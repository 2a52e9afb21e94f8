"""`tandem gateway`: OpenAI-compatible HTTP in front of the router (FastAPI + uvicorn/uvloop).

config -> app -> uvicorn (SIGTERM/SIGINT: graceful, in-flight streams get the grace period).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig

log = logging.getLogger("tandem.gateway")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TANDEM_API_KEY", ""),
        help="require `Authorization: Bearer KEY` (env TANDEM_API_KEY)",
    )
    parser.add_argument("--served-model-name", default="", help="model name clients use")
    parser.add_argument("--max-n", type=int, default=16)
    parser.add_argument("--max-body-bytes", type=int, default=4 << 20)
    parser.add_argument("--timeout-graceful-shutdown", type=float, default=5.0)
    parser.add_argument("--log-level", default="warning")
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        router=args.router,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
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


def make_server(config: GatewayConfig, log_level: str = "warning", grace_s: float = 5.0):
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
        log_level=log_level.lower(),
        access_log=log_level.lower() in ("debug", "info"),
        timeout_graceful_shutdown=grace_s,
    )
    return _Server(uv_config)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    config = config_from_args(args)
    log.warning(
        "event=gateway_starting address=%s:%d router=%s", config.host, config.port, config.router
    )
    make_server(config, args.log_level, args.timeout_graceful_shutdown).run()


def main(argv: list[str] | None = None) -> None:
    parser = add_cli_args(argparse.ArgumentParser(prog="tandem gateway"))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
