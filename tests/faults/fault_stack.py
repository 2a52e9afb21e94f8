"""Real processes on 127.0.0.1 that tests can hurt: prefill and decode servers (static
addresses), a router and a gateway, each logging to its own file. A worker can be killed
(any signal) and restarted on the same port; the router's health polling takes it back.
With `stall_kv_req_id` the prefill servers run tests/faults/stalling_prefill.py: the KV push
of that worker req_id stalls before its last message.

Engine flags are the CI ones: SmolLM2 on CPU, 512 blocks, 256-token steps.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from kvtransfer.pool import sweep_stale_pool_files
from protos import worker_pb2, worker_pb2_grpc
from router.client import TandemClient
from rpc.procs import wait_grpc_healthy, wait_http_healthy

MODEL_NAME = "SmolLM2-135M-Instruct"
NUM_BLOCKS = 512
ENGINE_FLAGS = ["--num-blocks", str(NUM_BLOCKS), "--max-num-batched-tokens", "256"]
START_TIMEOUT_S = 240  # model load on a busy 2-core CI machine
STALLING_PREFILL = Path(__file__).resolve().parent / "stalling_prefill.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultStack:
    def __init__(
        self,
        model_dir: Path,
        log_dir: Path,
        num_prefill: int,
        num_decode: int,
        worker_env: dict[str, str] | None = None,
        router_flags: tuple[str, ...] = (),
        worker_flags: dict[str, tuple[str, ...]] | None = None,  # role -> extra flags
        stall_kv_req_id: str = "",  # this worker req_id's KV push stalls before `done`
    ) -> None:
        self.model_dir = model_dir
        self.worker_flags = worker_flags or {}
        self.log_dir = log_dir
        self.worker_env = {**os.environ, **(worker_env or {})}
        self.procs: dict[str, subprocess.Popen] = {}  # address (or name) -> process
        self.cmds: dict[str, list[str]] = {}
        self._py = [sys.executable, "-m", "tandem_cli.main"]
        self._prefill = [*self._py, "prefill"]
        if stall_kv_req_id:
            self._prefill = [sys.executable, str(STALLING_PREFILL), "--stall-kv-req-id"]
            self._prefill.append(stall_kv_req_id)
        self.prefill = [f"127.0.0.1:{free_port()}" for _ in range(num_prefill)]
        self.decode = [f"127.0.0.1:{free_port()}" for _ in range(num_decode)]
        try:
            for role, addrs in (("prefill", self.prefill), ("decode", self.decode)):
                for a in addrs:
                    self._spawn_worker(role, a, self.worker_flags.get(role, ()))
            for a in self.workers:
                wait_grpc_healthy(a, self.procs[a], START_TIMEOUT_S)
            self.router = f"127.0.0.1:{free_port()}"
            cmd = [*self._py, "router", "--port", self.router.rsplit(":", 1)[1]]
            cmd += ["--model", str(model_dir), "--served-model-name", MODEL_NAME, *router_flags]
            for a in self.prefill:
                cmd += ["--prefill", a]
            for a in self.decode:
                cmd += ["--decode", a]
            self._spawn("router", cmd)
            wait_grpc_healthy(self.router, self.procs["router"], 60)
            port = free_port()
            self._spawn(
                "gateway", [*self._py, "gateway", "--port", str(port), "--router", self.router]
            )
            self.base_url = f"http://127.0.0.1:{port}/v1"
            wait_http_healthy(f"http://127.0.0.1:{port}/health", self.procs["gateway"], 60)
        except BaseException:
            self.stop()
            raise

    @property
    def workers(self) -> list[str]:
        return self.prefill + self.decode

    def _spawn_worker(self, role: str, address: str, flags: tuple[str, ...] = ()) -> None:
        port = address.rsplit(":", 1)[1]
        start = self._prefill if role == "prefill" else [*self._py, role]
        cmd = [*start, "--port", port, "--model", str(self.model_dir), *ENGINE_FLAGS]
        cmd += flags
        self._spawn(address, cmd, self.worker_env)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name.replace(':', '_')}.log", "ab")  # noqa: SIM115
        self.cmds[name] = cmd
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()  # the child holds its own descriptor

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name.replace(':', '_')}.log").read_text(errors="replace")

    # -- faults ---------------------------------------------------------------------------
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        p.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            p.wait(timeout=30)

    def restart(self, address: str, timeout: float = 60.0) -> None:
        """A killed worker again, same port and flags; returns once the router has routed a
        request to it (its channel may sit in reconnect backoff for a while)."""
        assert self.procs[address].poll() is not None, "restart only a dead worker"
        self._spawn(address, self.cmds[address], self.worker_env)
        wait_grpc_healthy(address, self.procs[address], START_TIMEOUT_S)
        deadline = time.monotonic() + timeout
        with TandemClient(self.router, timeout=60) as client:
            for i in itertools.count():
                if self.stats(address).prefix_cache_queries > 0:
                    return
                assert time.monotonic() < deadline, f"the router never routed to {address}"
                client.complete(f"warm up {i}", max_tokens=1)
                time.sleep(0.2)

    # -- observation ------------------------------------------------------------------------
    def stats(self, address: str, timeout: float = 5.0) -> worker_pb2.WorkerStats:
        with grpc.insecure_channel(address) as ch:
            stub = worker_pb2_grpc.DecodeStub(ch)  # Stats is the same message on both roles
            if address in self.prefill:
                stub = worker_pb2_grpc.PrefillStub(ch)
            return stub.Stats(worker_pb2.StatsRequest(), timeout=timeout)

    def live_workers(self) -> list[str]:
        return [a for a in self.workers if self.procs[a].poll() is None]

    def wait_idle(self, timeout: float = 30.0) -> dict[str, worker_pb2.WorkerStats]:
        """Poll every live worker until nothing runs, waits or is being handed off and every
        KV block is free again (cached-free counts as free); the last Stats seen. Bounded:
        returns whatever it saw at the deadline, for the caller to assert on."""
        deadline = time.monotonic() + timeout
        while True:
            seen = {a: self.stats(a) for a in self.live_workers()}
            idle = all(
                s.num_running == 0
                and s.num_waiting == 0
                and s.num_active_handoffs == 0
                and s.num_free_blocks == s.num_total_blocks
                for s in seen.values()
            )
            if idle or time.monotonic() > deadline:
                return seen
            time.sleep(0.2)

    def stop(self) -> None:
        # The tests are over: no drain needed, and a drain waits out quiet periods.
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait(timeout=30)
        sweep_stale_pool_files()  # killed decode servers leave their shm KV pool files
