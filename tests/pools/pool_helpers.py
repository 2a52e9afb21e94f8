"""A pool stack on 127.0.0.1: a router that learns its workers from the Registry, real
prefill/decode processes (SmolLM2 on CPU), metrics scraped over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rpc.procs import free_port, wait_grpc_healthy
from tandem.loader.default_model import DEFAULT_MODEL_NAME

HOST = "127.0.0.1"
HEARTBEAT_MS = 400
ENGINE_FLAGS = ["--num-blocks", "512", "--max-num-batched-tokens", "256"]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Prometheus text at 127.0.0.1:port -> {(sample name, labels): value}."""
    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=2).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass
class Worker:
    role: str
    proc: subprocess.Popen
    address: str
    log: Path  # its stdout + stderr
    metrics_port: int

    def log_text(self) -> str:
        return self.log.read_text()


class PoolStack:
    """A router (one static decode server) plus workers that register themselves."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.router_proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.router = f"{HOST}:{free_port(HOST)}"
        self.router_metrics_port = free_port(HOST)
        cmd = self._cli("router", self.router)
        cmd += ["--served-model-name", DEFAULT_MODEL_NAME, "--metrics-port"]
        cmd += [str(self.router_metrics_port), "--heartbeat-interval-ms", str(HEARTBEAT_MS)]
        # The static decode server listens before the router starts: a client that keeps
        # dialing a loopback port in the ephemeral range with nothing listening can be handed
        # that very port as its source (TCP self-connect), and the server then cannot bind.
        self.static_decode = self.start_worker("decode", register=False)
        self.router_proc, self.router_log_path = self._spawn(
            [*cmd, "--decode", self.static_decode.address], "router"
        )
        self.prefill = self.start_worker("prefill", wait=False)
        wait_grpc_healthy(self.router, self.router_proc, 60)
        self.wait_healthy(self.prefill)
        self.wait_members("prefill", 1)

    def _cli(self, role: str, address: str) -> list[str]:
        port = address.rsplit(":", 1)[1]
        return [
            sys.executable,
            "-m",
            "tandem_cli.main",
            role,
            "--port",
            port,
            "--model",
            str(self.model_dir),
        ]

    def _spawn(self, cmd: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = self.log_dir / f"{name}-{len(self.procs)}.log"
        with log.open("w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
        return self.procs[-1], log

    def start_worker(
        self, role: str, address: str = "", register: bool = True, wait: bool = True, extra=()
    ) -> Worker:
        address = address or f"{HOST}:{free_port(HOST)}"
        metrics_port = free_port(HOST)
        cmd = [*self._cli(role, address), *ENGINE_FLAGS, "--metrics-port", str(metrics_port)]
        if register:
            cmd += ["--router", self.router]
        proc, log = self._spawn([*cmd, *extra], role)
        w = Worker(role, proc, address, log, metrics_port)
        if wait:
            self.wait_healthy(w)
        return w

    def wait_healthy(self, w: Worker) -> None:
        try:
            wait_grpc_healthy(w.address, w.proc, 180)
        except (RuntimeError, TimeoutError) as e:  # say why: the worker's own last words
            tail = "\n".join(w.log_text().splitlines()[-40:])
            raise RuntimeError(f"{w.role} worker {w.address}: {e}\n--- its log ---\n{tail}") from e

    # -- the router's view ----------------------------------------------------------------

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        return scrape(self.router_metrics_port)

    def members(self, role: str, state: str = "serving") -> int:
        labels = {("model_name", DEFAULT_MODEL_NAME), ("role", role), ("state", state)}
        return int(self.metrics()[("tandem:workers", frozenset(labels))])

    def wait_members(self, role: str, n: int, state: str = "serving", timeout: float = 30):
        wait_until(lambda: self.members(role, state) == n, timeout, f"{n} {state} {role}")

    def routed(self, role: str, address: str) -> int:
        labels = {("model_name", DEFAULT_MODEL_NAME), ("role", role), ("worker", address)}
        return int(self.metrics().get(("tandem:routed_requests_total", frozenset(labels)), 0))

    def router_log(self) -> str:
        return self.router_log_path.read_text()

    def stop(self) -> None:
        # workers first, so they deregister from the live router and drain quickly
        _terminate([p for p in self.procs if p is not self.router_proc])
        _terminate(self.procs)


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
