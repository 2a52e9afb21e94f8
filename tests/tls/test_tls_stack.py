"""A whole stack under mutual TLS, real processes on 127.0.0.1: `tandem serve` (router,
1 prefill, 1 decode, gateway; SmolLM2 on CPU) given the TLS flags, plus one more decode
server that registers itself with the router (--router). The gateway serves a completion
to the real openai client through a remote prefill and a KV push; clients with the wrong
credentials are refused by the router and by the workers, which keep serving."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import openai
import pytest
from certs import bad_clients
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import worker_pb2, worker_pb2_grpc
from rpc.procs import free_port, wait_grpc_healthy, wait_http_healthy
from rpc.tls import channel
from tandem.loader.default_model import DEFAULT_MODEL_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HOST = "127.0.0.1"
START_TIMEOUT_S = 240  # three model loads on a busy 2-core CI machine
SERVING = health_pb2.HealthCheckResponse.SERVING


def _tls_flags(certs) -> list[str]:
    return [
        "--tls-certfile", str(certs.server.cert), "--tls-keyfile", str(certs.server.key),
        "--tls-ca-certs", str(certs.ca), "--tls-require-client-cert",
    ]  # fmt: skip


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: serve and what it started
        proc.wait()


class Stack:
    def __init__(self, certs, log_dir, client_tls) -> None:
        self.log_dir = log_dir
        self.router = f"{HOST}:{free_port(HOST)}"
        self.http_port = free_port(HOST)
        self.serve_out = log_dir / "serve.out"
        self.serve_err = log_dir / "serve.err"
        cmd = [sys.executable, "-m", "tandem_cli.main", "serve", "--host", HOST]
        cmd += ["--port", str(self.http_port), "--router-port", self.router.rsplit(":", 1)[1]]
        cmd += ["--num-blocks", "512", "--max-num-batched-tokens", "256"]
        cmd += ["--startup-timeout", str(START_TIMEOUT_S), *_tls_flags(certs)]
        with open(self.serve_out, "wb") as out, open(self.serve_err, "wb") as err:
            self.serve = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        self.joiner = None
        try:
            wait_http_healthy(f"http://{HOST}:{self.http_port}/health", self.serve, START_TIMEOUT_S)
            text = self.serve_out.read_text()
            # serve prints each child it starts: event=child_started role=R index=I address=A
            self.prefill = re.search(r"child_started role=prefill index=0 address=(\S+)", text)[1]
            self.decode = re.search(r"child_started role=decode index=0 address=(\S+)", text)[1]
            self.joiner_log = log_dir / "joiner.log"
            self.joiner_address = f"{HOST}:{free_port(HOST)}"
            cmd = [sys.executable, "-m", "tandem_cli.main", "decode", "--host", HOST]
            cmd += ["--port", self.joiner_address.rsplit(":", 1)[1], "--router", self.router]
            cmd += ["--num-blocks", "512", "--max-num-batched-tokens", "256"]
            cmd += ["--served-model-name", DEFAULT_MODEL_NAME, *_tls_flags(certs)]
            with open(self.joiner_log, "wb") as log:
                self.joiner = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            wait_grpc_healthy(self.joiner_address, self.joiner, START_TIMEOUT_S, client_tls)
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}/v1"

    def stop(self) -> None:
        if self.joiner is not None:
            _stop(self.joiner)
        _stop(self.serve)


@pytest.fixture(scope="module")
def stack(certs, client_tls, tmp_path_factory):
    s = Stack(certs, tmp_path_factory.mktemp("tls_stack"), client_tls)
    yield s
    s.stop()


def _stats(address: str, tls, stub_class) -> worker_pb2.WorkerStats:
    with channel(address, tls) as ch:
        return stub_class(ch).Stats(worker_pb2.StatsRequest(), timeout=10)


def test_completion_through_gateway_with_remote_prefill(stack, server_tls):
    # Stats answers the router's role only: the stack's own certificate (every role) asks
    before = _stats(stack.prefill, server_tls, worker_pb2_grpc.PrefillStub)
    client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=120)
    resp = client.completions.create(
        model=DEFAULT_MODEL_NAME,
        prompt="The capital of France is a city called",
        max_tokens=8,
        temperature=0,
    )
    assert resp.usage.completion_tokens == 8 and resp.choices[0].text.strip()
    # The prefill server computed the prompt (its prefix-cache lookups grew by it) ...
    after = _stats(stack.prefill, server_tls, worker_pb2_grpc.PrefillStub)
    assert after.prefix_cache_queries - before.prefix_cache_queries >= resp.usage.prompt_tokens
    # ... and its KV push to the decode server was taken: no worker failed, nothing retried.
    log = stack.serve_err.read_text()
    assert "event=worker_failed" not in log and "kv_receive_failed" not in log


def test_healthcheck_command_against_the_tls_router(stack, certs):
    probe = [sys.executable, "-m", "tandem_cli.healthcheck", stack.router]
    env = {
        **os.environ,
        "TANDEM_TLS_CERTFILE": str(certs.client.cert),
        "TANDEM_TLS_KEYFILE": str(certs.client.key),
        "TANDEM_TLS_CA_CERTS": str(certs.ca),
    }
    assert subprocess.run(probe, env=env, timeout=60).returncode == 0
    plain = subprocess.run(probe, timeout=60, capture_output=True, text=True)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_worker_registers_over_tls(stack):
    # Register answered over mutual TLS (a refusal would stop the worker) ...
    _wait_for(
        lambda: "event=worker_registered" in stack.joiner_log.read_text(),
        60,
        "registration",
        stack.joiner,
    )
    # ... and on SIGTERM the router confirms its Deregister, over the same channel.
    _stop(stack.joiner)
    assert stack.joiner.returncode == 0
    assert "deregistered=True" in stack.joiner_log.read_text()


@pytest.mark.parametrize("client", ["plaintext", "no_client_cert", "trusts_other_ca",
                                    "cert_from_other_ca"])  # fmt: skip
@pytest.mark.parametrize("target", ["router", "prefill", "decode"])
def test_wrong_credentials_are_refused(stack, certs, client_tls, target, client):
    address = getattr(stack, target)
    with channel(address, bad_clients(certs)[client]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(address, client_tls) as ch:  # the server still serves the right clients
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == SERVING
