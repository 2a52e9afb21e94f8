"""`tandem serve` with its defaults (mutual TLS with a throw-away CA, internal servers on
127.0.0.1) as a security-test target: the children's addresses come from serve's
`event=child_started` lines, its certificate directory from the startup line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from attacks import Target

from rpc.procs import free_port, wait_http_healthy

HOST = "127.0.0.1"
START_TIMEOUT_S = 300  # two model loads on a busy 2-core CI machine
ENGINE_FLAGS = ["--num-blocks", "512", "--max-num-batched-tokens", "256"]
_CHILD = re.compile(r"event=child_started role=(\w+) index=(\d+) address=(\S+) pid=(\d+)")
_CERTS = re.compile(r"credentials in (\S+?)[;,)]")


class ServeStack:
    def __init__(self, log_dir: Path, api_key: str, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port(HOST)
        self.out = log_dir / "serve.out"
        cmd = [sys.executable, "-m", "tandem_cli.main", "serve", "--port", str(self.port)]
        cmd += ["--api-key", api_key, "--startup-timeout", str(START_TIMEOUT_S), *ENGINE_FLAGS]
        cmd += list(extra)
        with open(self.out, "wb") as out, open(log_dir / "serve.err", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        try:
            url = f"http://{HOST}:{self.port}/health"
            wait_http_healthy(url, self.proc, START_TIMEOUT_S)
            deadline = time.monotonic() + 120  # the banner follows health: it asks the workers
            while not _CERTS.search(text := self.out.read_text()):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"no startup banner from tandem serve: {text[-2000:]}")
                time.sleep(0.2)
            children: dict[str, list[str]] = {}
            for role, _, address, _ in _CHILD.findall(text):
                children.setdefault(role, []).append(address)
            cert_dir = Path(_CERTS.search(text)[1])
        except BaseException:
            self.stop()
            raise
        self.target = Target(
            base_url=f"http://{HOST}:{self.port}/v1",
            router=children["router"][0],
            prefill=children.get("prefill", []),
            decode=children["decode"],
            cert_dir=cert_dir,
            api_key=api_key,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
