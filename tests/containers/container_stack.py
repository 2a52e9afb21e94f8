"""compose.yaml in real containers on this host: deploy/containers/run.sh builds the image (and
the base image the first time), brings up certs, router, one prefill, one decode server and the
gateway with the CPU override (host networking, every port on 127.0.0.1, the default model
mounted from the host's tandem cache) and takes it down again; this class drives podman and
podman-compose against that project and reads what the tests assert on: the router's
Prometheus counters and the containers' logs and states.

The engine is podman (run.sh's containers.conf: cgroupfs, runc, no default rlimits); the
tests are skipped where `podman info` does not work.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from rpc.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "deploy" / "containers" / "run.sh"
CONTAINERS_CONF = ROOT / "deploy" / "containers" / "containers.conf"
PROJECT = "tandem-test"
MODEL_NAME = "SmolLM2-135M-Instruct"
BUILD_TIMEOUT_S = 3600  # a fresh base image and image build on 2 cores, downloads included
UP_TIMEOUT_S = 1200
_ROUTED = re.compile(
    r"^tandem:routed_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.e+]+)$", re.M
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def engine_problem() -> str | None:
    """Why the container tests cannot run here, or None."""
    if shutil.which("podman") is None:
        return "no container engine: podman is not installed"
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    r = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"podman does not work here: {r.stderr.strip()[-300:]}"
    if shutil.which("mmdebstrap") is None:
        r = subprocess.run(
            ["podman", "image", "exists", "localhost/tandem-base:bookworm"], env=env, timeout=60
        )
        if r.returncode != 0:
            return "no base image and no mmdebstrap to make one"
    return None


class ContainerStack:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.gateway_port = free_port("127.0.0.1")
        self.router_port = free_port("127.0.0.1")
        self.router_metrics_port = free_port("127.0.0.1")
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(CONTAINERS_CONF),
            "TANDEM_COMPOSE_PROJECT": PROJECT,
            "TANDEM_PORT": str(self.gateway_port),
            "TANDEM_ROUTER_PORT": str(self.router_port),
            "TANDEM_ROUTER_METRICS_PORT": str(self.router_metrics_port),
            "TANDEM_LOG_LEVEL": "info",  # drain and registration events in the logs
        }
        self.base_url = f"http://127.0.0.1:{self.gateway_port}/v1"
        self.timings: dict[str, float] = {}

    # -- run.sh, podman-compose, podman ---------------------------------------------------------
    def run(self, *args: str, timeout: float = 600) -> None:
        name = args[0] if args[0] != "compose" else f"compose-{args[1]}"
        t0 = time.monotonic()
        with open(self.log_dir / f"{name}.log", "a") as log:
            r = subprocess.run(
                [str(RUN_SH), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout,
            )  # fmt: skip
        self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0
        assert r.returncode == 0, f"run.sh {' '.join(args)} failed: see {self.log_dir}/{name}.log"

    def compose(self, *args: str, timeout: float = 600) -> None:
        self.run("compose", *args, timeout=timeout)

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        r = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert not check or r.returncode == 0, f"podman {' '.join(args)}: {r.stderr}"
        return r.stdout

    def start(self) -> None:
        # TANDEM_CONTAINER_NO_BUILD=1: run the image that is there (iterating on the tests
        # while the tree changes under the build context)
        if os.environ.get("TANDEM_CONTAINER_NO_BUILD") != "1":
            self.run("build", timeout=BUILD_TIMEOUT_S)
        self.run("up", timeout=UP_TIMEOUT_S)

    def down(self) -> None:
        self.run("down", timeout=300)

    # -- observation ---------------------------------------------------------------------------
    def containers(self, service: str | None = None, all_states: bool = True) -> list[str]:
        args = ["ps", "--sort", "created", "--format", "{{.Names}}"]
        args += ["--filter", f"label=io.podman.compose.project={PROJECT}"]
        if service:
            args += ["--filter", f"label=io.podman.compose.service={service}"]
        if all_states:
            args.append("-a")
        return self.podman(*args).split()

    def pods(self) -> list[str]:
        return self.podman("pod", "ps", "--format", "{{.Name}}").split()

    def worker_address(self, container: str) -> str:
        """The address a worker container registered: it wrote its port to /tmp/tandem-port."""
        port = self.podman("exec", container, "cat", "/tmp/tandem-port").strip()
        return f"127.0.0.1:{int(port)}"

    def logs(self, container: str) -> str:
        r = subprocess.run(
            ["podman", "logs", container], env=self.env, capture_output=True, text=True
        )
        return r.stdout + r.stderr

    def state(self, container: str) -> tuple[bool, int]:
        out = self.podman("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container)
        running, code = out.split()
        return running == "true", int(code)

    def routed(self, role: str) -> dict[str, float]:
        """tandem:routed_requests per worker address of one role, from the router's /metrics."""
        url = f"http://127.0.0.1:{self.router_metrics_port}/metrics"
        text = httpx.get(url, timeout=10).text
        out: dict[str, float] = {}
        for m in _ROUTED.finditer(text):
            labels = dict(_LABEL.findall(m["labels"]))
            if labels.get("role") == role:
                out[labels["worker"]] = float(m["value"])
        return out

    def save_logs(self) -> None:
        for c in self.containers():
            (self.log_dir / f"container-{c}.log").write_text(self.logs(c))
