"""Real processes on 127.0.0.1 for the abuse tests: a SmolLM2 prefill server and decode server,
and routers and gateways with the flags each test needs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from rpc.procs import free_port, wait_grpc_healthy, wait_http_healthy
from tandem.loader.default_model import resolve_model_dir

MODEL = "smol"
MAX_MODEL_LEN = 256  # bounds the work any accepted request can cause
PY = [sys.executable, "-m", "tandem_cli.main"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Cluster:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.model_dir = str(resolve_model_dir(None))

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        self.procs.append(subprocess.Popen(cmd))
        return self.procs[-1]

    def start_workers(self) -> None:
        engine = ["--model", self.model_dir, "--num-blocks", "256", "--max-model-len",
                  str(MAX_MODEL_LEN), "--max-num-batched-tokens", "512"]  # fmt: skip
        self.prefill, self.decode = (f"127.0.0.1:{free_port('127.0.0.1')}" for _ in range(2))
        procs = [
            self._spawn([*PY, role, "--port", addr.rsplit(":", 1)[1], *engine])
            for role, addr in (("prefill", self.prefill), ("decode", self.decode))
        ]
        for addr, proc in zip((self.prefill, self.decode), procs, strict=True):
            wait_grpc_healthy(addr, proc, 180)

    def router(self, port: int = 0, *flags: str) -> tuple[str, subprocess.Popen]:
        """A router over the package's workers (port 0: a free one)."""
        address = f"127.0.0.1:{port or free_port('127.0.0.1')}"
        proc = self._spawn(
            [*PY, "router", "--port", address.rsplit(":", 1)[1], "--model", self.model_dir,
             "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
             "--prefill", self.prefill, "--decode", self.decode, *flags]
        )  # fmt: skip
        wait_grpc_healthy(address, proc, 60)
        return address, proc

    def gateway(self, router: str, *flags: str) -> tuple[str, subprocess.Popen]:
        port = free_port("127.0.0.1")
        proc = self._spawn([*PY, "gateway", "--port", str(port), "--router", router, *flags])
        url = f"http://127.0.0.1:{port}"
        wait_http_healthy(url + "/health", proc, 60)
        return url, proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
