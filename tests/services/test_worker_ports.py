"""A worker binds its ports before it loads the model, and a taken port is an error at once:
grpc's default SO_REUSEPORT would otherwise let two servers share the port and split its
connections between them."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from rpc.procs import free_port

HOST = "127.0.0.1"


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_a_worker_on_a_taken_grpc_port_exits_before_loading_the_model(role, tmp_path):
    taken = grpc.server(futures.ThreadPoolExecutor(1))  # grpc's defaults: SO_REUSEPORT on
    port = taken.add_insecure_port(f"{HOST}:0")
    taken.start()
    try:
        # a model path that does not exist: loading it would fail with another message
        cmd = [sys.executable, "-m", "tandem_cli.main", role, "--host", HOST, "--port", str(port)]
        cmd += ["--model", str(tmp_path / "no-such-model")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert f"tandem {role}: cannot bind {HOST}:{port}" in done.stderr, done.stderr
        assert "no-such-model" not in done.stderr
    finally:
        taken.stop(None)


def test_a_worker_on_a_taken_metrics_port_exits_before_loading_the_model(tmp_path):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        metrics_port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "tandem_cli.main", "decode", "--host", HOST]
        cmd += ["--port", str(free_port(HOST)), "--metrics-port", str(metrics_port)]
        cmd += ["--model", str(tmp_path / "no-such-model")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "tandem decode: " in done.stderr and "no-such-model" not in done.stderr, done.stderr
