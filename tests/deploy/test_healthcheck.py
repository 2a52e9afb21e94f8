"""`python -m tandem_cli.healthcheck` against a real grpc.health.v1 server and a real HTTP server
on 127.0.0.1: exit 0 only while the target says it is healthy."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem_cli.healthcheck import main as healthcheck

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def grpc_health():
    """A grpc server with the standard health servicer; yields (address, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", SERVING)
    servicer.set("tandem.v1.Decode", SERVING)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


@pytest.fixture
def http_health():
    """An HTTP server answering 200 on /health and 503 on /down; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The probe as a container runs it: its own interpreter, exit status read by the caller.
    Also reports whether it imported torch (it must not: it runs beside a loading model)."""
    code = (
        "import sys\nfrom tandem_cli.healthcheck import main\nrc = main(sys.argv[1:])\n"
        "print('torch' in sys.modules)\nsys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_cli_exits_0_for_a_serving_server_without_importing_torch(grpc_health):
    address, _ = grpc_health
    proc = run_cli(address)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_cli_exits_1_when_nothing_listens():
    proc = run_cli(f"127.0.0.1:{closed_port()}", "--timeout", "2")
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr


def test_module_entry_point_runs(grpc_health):
    address, _ = grpc_health
    proc = subprocess.run(
        [sys.executable, "-m", "tandem_cli.healthcheck", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_not_serving_is_unhealthy_and_serving_again_is_healthy(grpc_health, capsys):
    address, servicer = grpc_health
    servicer.set("", NOT_SERVING)  # what a draining worker reports
    assert healthcheck([address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    servicer.set("", SERVING)
    assert healthcheck([address]) == 0


def test_named_service(grpc_health, capsys):
    address, servicer = grpc_health
    assert healthcheck([address, "--service", "tandem.v1.Decode"]) == 0
    servicer.set("tandem.v1.Decode", NOT_SERVING)
    assert healthcheck([address, "--service", "tandem.v1.Decode"]) == 1
    assert healthcheck([address, "--service", "tandem.v1.Prefill"]) == 1  # not served here
    assert "NOT_FOUND" in capsys.readouterr().err


def test_http_target(http_health, capsys):
    assert healthcheck([f"{http_health}/health"]) == 0
    assert healthcheck([f"{http_health}/down"]) == 1
    assert "HTTP 503" in capsys.readouterr().err
    assert healthcheck([f"http://127.0.0.1:{closed_port()}/health", "--timeout", "2"]) == 1
