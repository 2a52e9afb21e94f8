"""`tandem serve` supervises its children: kill -9 of a prefill server, of a decode server and of
the router under 8 concurrent streams, and SIGTERM of a decode server under load. Each time
every stream ends with the text of a run without the fault or with a clean OpenAI error (no
hang), the stack keeps serving, and the victim comes back as a new process on the same port
that the router uses again. Last, Ctrl-C of serve right after a restart leaves no child behind.

One stack for the module (2 prefill + 2 decode servers, router, gateway; CI engine flags), its
internal plane on serve's default mutual TLS: the tests read the client and router
certificates from the directory serve prints, to check health and ask workers for Stats.
"""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtransfer.pool import sweep_stale_pool_files
from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import TLSConfig, channel
from tandem_cli.supervisor import Backoff, Child, Supervisor

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "SmolLM2-135M-Instruct"
ENGINE_FLAGS = ["--num-blocks", "512", "--max-num-batched-tokens", "256"]
START_TIMEOUT_S = 300  # four model loads at once on a busy 2-core machine
BACK_TIMEOUT_S = 240  # a restarted child loads its model again
MAX_TOKENS = 40
# Eight prompts of 20 to ~400 tokens: the long ones take several 256-token prefill steps, so
# a prefill server is caught mid-prompt.
PROMPTS = [
    "Notes on the harbour.\n"
    + "\n".join(f"Entry {j}: ship {j * 7 % 13} left at hour {j * 5 % 24}." for j in range(n))
    + "\nSummary:"
    for n in (1, 30, 4, 22, 9, 2, 16, 12)
]


def test_a_child_that_keeps_crashing_backs_off_and_stop_restarts_nothing(caplog):
    """No model: a child that exits at once is restarted after 0.1, 0.2, 0.4, 0.4 ... s (not
    in a tight loop), each exit a WARNING and each restart an INFO line; stop() SIGTERMs what
    runs and starts nothing, even with a restart due."""
    caplog.set_level(logging.INFO, logger="tandem.serve")
    out = io.StringIO()
    sup = Supervisor(Backoff(initial_s=0.1, max_s=0.4, reset_after_s=60), out=out)
    crash = sup.start(Child("decode", 0, "127.0.0.1:1", [sys.executable, "-c", "exit(3)"]))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        sup.poll()
        time.sleep(0.01)
    starts = out.getvalue().count("event=child_started role=decode index=0 ")
    assert 3 <= starts <= 12, out.getvalue()  # a tight loop would start hundreds
    assert crash.delay_s == 0.4 and crash.num_restarts == starts - 1
    exits = [r for r in caplog.records if "event=child_exited role=decode" in r.message]
    assert exits and all(r.levelno == logging.WARNING for r in exits)
    assert all("returncode=3" in r.message for r in exits)
    assert any(
        r.levelno == logging.INFO and "event=child_restarted role=decode" in r.message
        for r in caplog.records
    )

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    sleeper = sup.start(Child("router", 0, "127.0.0.1:2", sleep))
    while crash.restart_at is None:  # wait for the crash loop to have a restart pending
        sup.poll()
        time.sleep(0.01)
    sup.stop()
    assert sleeper.proc.returncode == -signal.SIGTERM
    time.sleep(0.5)  # past the pending restart's time
    sup.poll()
    assert out.getvalue().count("event=child_started") == starts + 1  # + the sleeper, no more


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeStack:
    """A `tandem serve` process, the children it reports on stdout, and its certificates."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "tandem_cli.main", "serve", "--port", str(self.port)]
        cmd += ["--prefill", "2", "--decode", "2", *ENGINE_FLAGS]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            banner = self.wait_line(lambda line: "tandem is serving" in line, START_TIMEOUT_S)
        except BaseException:
            self.stop()  # serve stops the children it started
            raise
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.cert_dir = Path(re.search(r"client credentials in (\S+?)\)", banner).group(1))
        self.client_tls = self._tls("client")
        self.router_tls = self._tls("router")  # workers answer Stats to the router role only

    def _tls(self, role: str) -> TLSConfig:
        d = self.cert_dir
        return TLSConfig.from_files(
            str(d / f"{role}.pem"), str(d / f"{role}-key.pem"), str(d / "ca.pem")
        )

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, match: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no such line from serve; its log: {self.log_path}")
                self._cond.wait(min(left, 1.0))

    def started(self) -> list[dict[str, str]]:
        with self._cond:
            lines = [ln for ln in self.lines if ln.startswith("event=child_started ")]
        return [dict(kv.split("=", 1) for kv in ln.split()) for ln in lines]

    def child(self, role: str, index: int = 0) -> dict[str, str]:
        """The latest start of that child: address, pid, restarts."""
        found = [c for c in self.started() if c["role"] == role and c["index"] == str(index)]
        return found[-1]

    def wait_restarted(self, role: str, index: int, old: dict[str, str]) -> dict[str, str]:
        """The next start of that child after `old` (a start line of the same child)."""
        restarts = int(old["restarts"]) + 1
        prefix = f"event=child_started role={role} index={index} "
        self.wait_line(
            lambda ln: ln.startswith(prefix) and ln.endswith(f" restarts={restarts}"),
            BACK_TIMEOUT_S,
        )
        new = self.child(role, index)
        assert new["address"] == old["address"] and new["pid"] != old["pid"]
        assert int(new["restarts"]) == int(old["restarts"]) + 1
        return new

    # -- observation ----------------------------------------------------------------------
    def wait_healthy(self, address: str, timeout: float = BACK_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with channel(address, self.client_tls) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"{address} never became healthy again"
                time.sleep(0.3)

    def stats(self, role: str, address: str) -> worker_pb2.WorkerStats:
        with channel(address, self.router_tls, peer_role=role) as ch:
            stub_cls = (
                worker_pb2_grpc.PrefillStub if role == "prefill" else worker_pb2_grpc.DecodeStub
            )
            return stub_cls(ch).Stats(worker_pb2.StatsRequest(), timeout=5)

    def complete(self, prompt: str, max_tokens: int = 4) -> str:
        client = openai.OpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=120)
        kw = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return client.completions.create(**kw).choices[0].text

    def wait_serving(self, timeout: float = BACK_TIMEOUT_S) -> None:
        """A new request succeeds (retried while the router itself is coming back)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                assert self.complete("Say something.")
                return
            except openai.APIError:
                assert time.monotonic() < deadline, "the stack did not serve again"
                time.sleep(1)

    def wait_in_pool(self, role: str, address: str, timeout: float = 120) -> None:
        """The router routes to the restarted worker again: it sees prompts."""
        deadline = time.monotonic() + timeout
        i = 0
        while self.stats(role, address).prefix_cache_queries == 0:
            assert time.monotonic() < deadline, f"the router never routed to {address}"
            self.complete(f"warm up {i}: tell me about number {i}", max_tokens=1)
            i += 1
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for c in self.started():  # whatever survived a failed run
            try:
                os.kill(int(c["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sweep_stale_pool_files()  # killed decode servers leave their shm KV pool files


class Streams:
    """Prompts as concurrent streams through the gateway; each ends as (text, finish) or
    the exception the OpenAI client raised."""

    def __init__(self, base_url: str, prompts: list[str]) -> None:
        self.base_url, self.prompts = base_url, prompts
        self.num_tokens = [0] * len(prompts)
        self.results: list[object] = [None] * len(prompts)
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(len(prompts))]
        for t in self.threads:
            t.start()

    def _one(self, i: int) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=180)
        text, finish = "", None
        try:
            for chunk in client.completions.create(
                model=MODEL, prompt=self.prompts[i], max_tokens=MAX_TOKENS, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            ):  # fmt: skip
                for choice in chunk.choices:
                    text += choice.text
                    finish = choice.finish_reason or finish
                    self.num_tokens[i] += 1
            self.results[i] = (text, finish)
        except Exception as e:  # noqa: BLE001 (the test judges it)
            self.results[i] = e

    def wait_progress(self, num_tokens: int, timeout: float = 120) -> None:
        """Until some stream has that many chunks (the fault lands mid-stream)."""
        deadline = time.monotonic() + timeout
        while max(self.num_tokens) < num_tokens:
            assert time.monotonic() < deadline, f"no stream reached {num_tokens} chunks"
            time.sleep(0.02)

    def join(self, timeout: float = 240) -> list[object]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a stream hung"
        return self.results


def _judge(results: list[object], reference: list[tuple[str, str]], may_fail: bool) -> int:
    """Each stream equals the no-fault run or (may_fail) ended in a clean API error: an
    OpenAI error the gateway sent, not a cut connection or a timeout. Returns how many failed."""
    failed = 0
    for i, (got, want) in enumerate(zip(results, reference, strict=True)):
        if isinstance(got, Exception):
            assert may_fail, f"stream {i} failed: {got!r}"
            assert isinstance(got, openai.APIError), f"stream {i}: {got!r}"
            assert not isinstance(got, openai.APIConnectionError), f"stream {i}: {got!r}"
            failed += 1
        else:
            assert got == want, f"stream {i}: {got!r} != {want!r}"
    return failed


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ServeStack(tmp_path_factory.mktemp("serve") / "serve.log")
    yield s
    s.stop()


def _prompts(tag: str) -> list[str]:
    """PROMPTS no earlier run has cached: the fault lands on real prefill work."""
    return [f"Run {tag}. {p}" for p in PROMPTS]


def _no_fault(stack: ServeStack, prompts: list[str]) -> list[tuple[str, str]]:
    results = Streams(stack.base_url, prompts).join()
    assert all(isinstance(r, tuple) and r[1] == "length" for r in results), results
    return results


def _busy(stack: ServeStack, role: str, field: str, timeout: float = 60) -> dict[str, str]:
    """The first child of `role` whose Stats show work (`field` > 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for index in range(2):
            child = stack.child(role, index)
            if getattr(stack.stats(role, child["address"]), field) > 0:
                return {**child, "index": str(index)}
        time.sleep(0.02)
    raise AssertionError(f"no {role} server was seen with {field} > 0")


def _fault(stack: ServeStack, role: str, field: str, sig: int, progress: int = 0) -> None:
    """Start the streams, hit a busy `role` child with `sig`; every stream must end as the
    no-fault run does (the router retries and migrates), the stack serve, and the victim
    come back into the pool."""
    prompts = _prompts(f"{role}-{sig}")
    streams = Streams(stack.base_url, prompts)
    if progress:
        streams.wait_progress(progress)
    victim = _busy(stack, role, field)
    os.kill(int(victim["pid"]), sig)
    faulty = streams.join()
    _judge(faulty, _no_fault(stack, prompts), may_fail=False)
    stack.complete("A new request after the fault.")
    back = stack.wait_restarted(role, int(victim["index"]), victim)
    stack.wait_healthy(back["address"])
    stack.wait_in_pool(role, back["address"])


def test_prefill_server_killed_under_load_comes_back(stack):
    _fault(stack, "prefill", "in_flight_prompt_tokens", signal.SIGKILL)


def test_decode_server_killed_mid_stream_comes_back(stack):
    _fault(stack, "decode", "num_running", signal.SIGKILL, progress=8)


def test_decode_server_sigterm_drains_and_comes_back(stack):
    _fault(stack, "decode", "num_running", signal.SIGTERM, progress=8)


def test_router_killed_mid_stream_comes_back(stack):
    old = stack.child("router")
    prompts = _prompts("router")
    streams = Streams(stack.base_url, prompts)
    streams.wait_progress(8)
    os.kill(int(old["pid"]), signal.SIGKILL)
    faulty = streams.join()
    back = stack.wait_restarted("router", 0, old)
    stack.wait_healthy(back["address"])
    stack.wait_serving()  # the gateway reconnected to the router's new process
    failed = _judge(faulty, _no_fault(stack, prompts), may_fail=True)
    print(f"router kill: {failed} of {len(PROMPTS)} streams ended with an error")
    assert "event=child_exited role=router" in stack.log_path.read_text()


def test_ctrl_c_right_after_a_restart_stops_every_child(stack):
    old = stack.child("gateway")
    os.kill(int(old["pid"]), signal.SIGKILL)
    stack.wait_restarted("gateway", 0, old)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(timeout=90) == 0
    for child in stack.started():
        assert not Path(f"/proc/{child['pid']}").exists() or _is_zombie(child["pid"]), child
    assert not stack.cert_dir.exists()  # serve removes its certificates


def _is_zombie(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
