"""Real processes on 127.0.0.1: 2 prefill servers, 1 decode server, router, gateway."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from rpc.procs import wait_grpc_healthy, wait_http_healthy
from tandem.loader.default_model import resolve_model_dir

MODEL_NAME = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, model_dir, policy: str) -> None:
        self.procs: list[subprocess.Popen] = []
        py = [sys.executable, "-m", "tandem_cli.main"]
        engine = [
            "--model",
            str(model_dir),
            "--num-blocks",
            "512",
            "--max-num-batched-tokens",
            "256",
        ]
        self.prefill = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        self.decode = [f"127.0.0.1:{free_port()}"]
        for role, addrs in (("prefill", self.prefill), ("decode", self.decode)):
            for a in addrs:
                self._spawn([*py, role, "--port", a.rsplit(":", 1)[1], *engine])
        for a, p in zip(self.prefill + self.decode, self.procs, strict=True):
            wait_grpc_healthy(a, p, 180)
        self.router = f"127.0.0.1:{free_port()}"
        cmd = [*py, "router", "--port", self.router.rsplit(":", 1)[1], "--model", str(model_dir)]
        cmd += ["--served-model-name", MODEL_NAME, "--routing-policy", policy]
        for a in self.prefill:
            cmd += ["--prefill", a]
        for a in self.decode:
            cmd += ["--decode", a]
        self.router_proc = self._spawn(cmd)
        wait_grpc_healthy(self.router, self.router_proc, 60)
        port = free_port()
        self.gateway_proc = self._spawn(
            [*py, "gateway", "--port", str(port), "--router", self.router]
        )
        self.base_url = f"http://127.0.0.1:{port}/v1"
        wait_http_healthy(f"http://127.0.0.1:{port}/health", self.gateway_proc, 60)

    def _spawn(self, cmd) -> subprocess.Popen:
        self.procs.append(subprocess.Popen(cmd))
        return self.procs[-1]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session")
def model_dir():
    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def stack(model_dir):
    s = Stack(model_dir, "prefix")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference_llm(model_dir):
    from tandem import LLM

    return LLM(model=str(model_dir))
