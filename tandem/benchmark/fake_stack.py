"""The real router and gateway in front of FAKE workers, as processes on 127.0.0.1.

For measuring the control plane (bench/control_plane.py) and for testing `tandem bench` end to
end without a model. The router needs a real HF model dir for its tokenizer and chat template.
With num_prefill = 0 the router runs aggregated (decode servers "prefill" themselves).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tandem.cli import _free_port, _wait_grpc_healthy, _wait_http_healthy


def free_port() -> int:
    return _free_port("127.0.0.1")


class FakeStack:
    """Fake workers + real router + real gateway; stop() (or `with`) ends every process."""

    def __init__(
        self,
        model_dir: str | Path,
        num_decode: int = 1,
        num_prefill: int = 0,
        itl_ms: float = 0.0,
        coalesce: bool = False,
        session: bool = False,
        router_args: tuple[str, ...] = (),
        served_model_name: str = "fake",
        startup_timeout: float = 60.0,
        stderr=None,
    ):
        self.procs: dict[str, subprocess.Popen] = {}
        self._stderr = stderr
        py = sys.executable
        try:
            workers = []
            for role, count in (("decode", num_decode), ("prefill", num_prefill)):
                for k in range(count):
                    addr = f"127.0.0.1:{free_port()}"
                    cmd = [py, "-m", "tandem.benchmark.fake_worker", "--role", role]
                    cmd += ["--port", addr.rsplit(":", 1)[1], "--itl-ms", str(itl_ms)]
                    cmd += ["--coalesce"] if coalesce else []
                    cmd += ["--session"] if session and role == "decode" else []
                    workers.append((role, addr, self._spawn(f"{role}-{k}", cmd)))
            for _, addr, proc in workers:
                _wait_grpc_healthy(addr, proc, startup_timeout)
            self.router = f"127.0.0.1:{free_port()}"
            cmd = [py, "-m", "tandem.cli", "router", "--port", self.router.rsplit(":", 1)[1]]
            cmd += ["--model", str(model_dir), "--served-model-name", served_model_name]
            for role, addr, _ in workers:
                cmd += [f"--{role}", addr]
            cmd += list(router_args)  # e.g. --stream-interval N
            _wait_grpc_healthy(self.router, self._spawn("router", cmd), startup_timeout)
            port = free_port()
            cmd = [py, "-m", "tandem.cli", "gateway", "--port", str(port), "--router", self.router]
            proc = self._spawn("gateway", cmd)
            self.base_url = f"http://127.0.0.1:{port}"
            _wait_http_healthy(f"{self.base_url}/health", proc, startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.procs[name] = subprocess.Popen(cmd, stderr=self._stderr)
        return self.procs[name]

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> FakeStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
