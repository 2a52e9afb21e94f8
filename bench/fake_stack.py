"""The real router and gateway in front of FAKE workers, as processes on 127.0.0.1.

For measuring the control plane (bench/control_plane.py) and for testing `tandem bench` end to
end without a model. The router needs a real HF model dir for its tokenizer and chat template.
With num_prefill = 0 the router runs aggregated (decode servers "prefill" themselves).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway.pool import gateway_pool
from rpc.pki import cert_paths, write_certs
from rpc.procs import free_port, wait_grpc_healthy, wait_http_healthy
from rpc.tls import PLAINTEXT, TLSConfig


def _name(role: str, k: int) -> str:
    """Process names: router, router-1, ... (the first keeps the plain name)."""
    return role if k == 0 else f"{role}-{k}"


class FakeStack:
    """Fake workers + real router + real gateway; stop() (or `with`) ends every process."""

    def __init__(
        self,
        model_dir: str | Path,
        num_decode: int = 1,
        num_prefill: int = 0,
        itl_ms: float = 0.0,
        coalesce: bool = False,
        router_args: tuple[str, ...] = (),
        num_routers: int = 1,
        num_gateways: int = 1,
        served_model_name: str = "fake",
        startup_timeout: float = 60.0,
        stderr=None,
        internal_auth: str = "none",  # "none" | "mtls": role certificates, as tandem serve
    ):
        self.procs: dict[str, subprocess.Popen] = {}
        self.model_dir = Path(model_dir)  # the router's tokenizer; clients need it too
        self._cert_dir = tempfile.mkdtemp(prefix="tandem-bench-certs-")
        if internal_auth == "mtls":
            write_certs(self._cert_dir)
        elif internal_auth != "none":
            raise ValueError(f"internal_auth: {internal_auth!r} (none, mtls)")

        def tls_flags(role: str) -> list[str]:
            if internal_auth == "none":
                return []
            cert, key = cert_paths(self._cert_dir, role)
            ca = f"{self._cert_dir}/ca.pem"
            return ["--tls-certfile", str(cert), "--tls-keyfile", str(key), "--tls-ca-certs", ca,
                    "--tls-require-client-cert"]  # fmt: skip

        # what this process checks health with (any role will do)
        self.tls = (
            TLSConfig.from_files(
                *map(str, cert_paths(self._cert_dir, "client")), f"{self._cert_dir}/ca.pem"
            )  # fmt: skip
            if internal_auth == "mtls"
            else PLAINTEXT
        )
        self._stderr = stderr
        self._metrics_dir: str | None = None
        py = sys.executable
        try:
            workers = []
            for role, count in (("decode", num_decode), ("prefill", num_prefill)):
                for k in range(count):
                    addr = f"127.0.0.1:{free_port('127.0.0.1')}"
                    cmd = [py, "-m", "bench.fake_worker", "--role", role]
                    cmd += ["--port", addr.rsplit(":", 1)[1], "--itl-ms", str(itl_ms)]
                    cmd += ["--coalesce"] if coalesce else []
                    cmd += tls_flags(role)
                    workers.append((role, addr, self._spawn(f"{role}-{k}", cmd)))
            for _, addr, proc in workers:
                wait_grpc_healthy(addr, proc, startup_timeout, self.tls)
            # as `tandem serve --routers N --gateways M`: gateway i on router i % N, the
            # gateways on one port (SO_REUSEPORT) with one metrics directory
            routers = []
            for k in range(num_routers):
                addr = f"127.0.0.1:{free_port('127.0.0.1')}"
                cmd = [py, "-m", "tandem_cli.main", "router", "--port", addr.rsplit(":", 1)[1]]
                cmd += ["--model", str(model_dir), "--served-model-name", served_model_name]
                for role, waddr, _ in workers:
                    cmd += [f"--{role}", waddr]
                cmd += list(router_args)  # e.g. --stream-interval N
                cmd += tls_flags("router")
                routers.append((addr, self._spawn(_name("router", k), cmd)))
            for addr, proc in routers:
                wait_grpc_healthy(addr, proc, startup_timeout, self.tls)
            self.router = routers[0][0]
            port = free_port("127.0.0.1")
            flags, env, self._metrics_dir = gateway_pool(num_gateways)
            for k in range(num_gateways):
                cmd = [py, "-m", "tandem_cli.main", "gateway", "--port", str(port)]
                cmd += ["--router", routers[k % num_routers][0], *flags, *tls_flags("gateway")]
                proc = self._spawn(_name("gateway", k), cmd, env)
            self.base_url = f"http://127.0.0.1:{port}"
            wait_http_healthy(f"{self.base_url}/health", proc, startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: list[str], env=None) -> subprocess.Popen:
        self.procs[name] = subprocess.Popen(cmd, stderr=self._stderr, env=env)
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
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        shutil.rmtree(self._cert_dir, ignore_errors=True)

    def __enter__(self) -> FakeStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
