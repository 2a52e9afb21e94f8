"""The README's first command: `tandem serve` brings the whole stack up and Ctrl-C takes it down."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

import tandem
from router.client import TandemClient, TandemError
from rpc.tls import PLAINTEXT, TLSConfig

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _start_serve(
    *flags: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int, str, dict[str, str]]:
    """`tandem serve` on a free port with the given flags; (process, port, the banner's first
    line, the banner's rows as {label: text})."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "tandem_cli.main",
        "serve",
        "--port",
        str(port),
        "--num-blocks",
        "256",
    ]
    proc = subprocess.Popen([*cmd, *flags], stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    line = ""
    while "serving" not in line:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("tandem serve did not come up")
        line = proc.stdout.readline()
    rows = {}
    while "metrics" not in rows:  # the banner's last row
        row = proc.stdout.readline()
        assert row, "tandem serve stopped in the middle of its banner"
        label, _, text = row.strip().partition("  ")
        rows[label] = text.strip()
    return proc, port, line, rows


def test_tandem_serve_starts_answers_and_stops_cleanly():
    proc, port, line, rows = _start_serve()
    try:
        assert f"http://127.0.0.1:{port}/v1" in line
        # the banner: version, model, device, the decode server's KV cache (--num-blocks 256
        # of 16 tokens), URLs and the router's client certificate
        assert rows["version"] == f"tandem {tandem.__version__}"
        assert rows["model"].startswith("SmolLM2-135M-Instruct (")
        assert rows["device"] == "cpu, dtype float32, tensor-parallel size 1"
        assert rows["KV cache"].endswith(": 4,096 tokens (256 blocks of 16)"), rows["KV cache"]
        assert rows["concurrency"].startswith("256 sequences per decode server")
        assert "0.50x requests of the full 8,192-token context" in rows["concurrency"]
        assert rows["OpenAI API"] == f"http://127.0.0.1:{port}/v1"
        assert rows["metrics"] == f"http://127.0.0.1:{port}/metrics"
        # default: internal mutual TLS with serve's own certificates, removed at exit
        cert_dir = line.split("client credentials in ")[1].split(")")[0]
        assert os.stat(cert_dir).st_mode & 0o777 == 0o700
        assert {"ca.pem", "client.pem", "client-key.pem", "router.pem"} <= set(os.listdir(cert_dir))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        models = [m.id for m in client.models.list().data]
        assert models == ["SmolLM2-135M-Instruct"]
        resp = client.chat.completions.create(
            model=models[0],
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=8,
            temperature=0,
        )
        assert resp.choices[0].message.content
        # the router's gRPC API, with the client certificate serve printed
        d = cert_dir + "/"
        tls = TLSConfig.from_files(d + "client.pem", d + "client-key.pem", d + "ca.pem")
        router = line.split("router grpc ")[1].split(";")[0]
        assert rows["gRPC router"] == (
            f"{router} (client certificate {d}client.pem, key {d}client-key.pem, CA {d}ca.pem)"
        )
        with TandemClient(router, timeout=30, tls=tls, max_retries=0) as c:
            assert c.models() == ["SmolLM2-135M-Instruct"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not os.path.exists(cert_dir)


def test_serve_with_stream_interval_and_async_scheduling_streams_the_same_text():
    """`tandem serve --stream-interval 3 --async-scheduling` (async forced on, here on CPU):
    streamed completions arrive 3 tokens a chunk (the first alone) and read the same as the
    non-streamed answer."""
    proc, port, _, _ = _start_serve("--stream-interval", "3", "--async-scheduling")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        kw = dict(model="SmolLM2-135M-Instruct", prompt="The capital of France is", temperature=0)
        kw["max_tokens"] = 10
        kw["extra_body"] = {"ignore_eos": True}
        whole = client.completions.create(**kw)
        chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
        texts = [c.choices[0].text for c in chunks]
        assert "".join(texts) == whole.choices[0].text
        assert whole.usage.completion_tokens == 10
        # 10 tokens: 1, then 3, 3, 3 (the last with the finish); never one chunk per token
        assert 3 <= len([t for t in texts if t]) <= 5
        assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the direct children of pid (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out[int(entry)] = cmd
    return out


SUCCESS = "vllm:request_success_total"


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT, /proc")
def test_serve_with_two_gateways_and_two_routers_shares_one_port_and_one_metrics_view():
    """`tandem serve --gateways 2 --routers 2`: two gateway processes on one port (each new
    connection lands on one of them), each on its own router; both answer, and /metrics, from
    whichever process, counts every request the two served."""
    proc, port, line, _ = _start_serve("--gateways", "2", "--routers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        assert "2 gateway(s)" in line and line.count("127.0.0.1:") == 3  # gateway + 2 routers
        gateways = {p: c for p, c in _children(proc.pid).items() if " gateway " in c}
        routers = {c.split("--router ")[1].split()[0] for c in gateways.values()}
        assert len(gateways) == 2 and len(routers) == 2  # each gateway on its own router
        assert all("--reuse-port" in c for c in gateways.values())
        # the second gateway may still be starting: wait until both listen
        time.sleep(3)

        n = 12
        for i in range(n):  # a new connection each time, so the kernel picks a gateway each time
            with httpx.Client(base_url=base, timeout=60) as http:
                r = http.post(
                    "/v1/completions",
                    json={
                        "model": "SmolLM2-135M-Instruct",
                        "prompt": f"Count to {i}:",
                        "max_tokens": 3,
                        "ignore_eos": True,
                        "stream": i % 2 == 1,
                    },
                )
                assert r.status_code == 200, r.text
        # Both processes recorded requests: prometheus-client keeps a file per process and pid.
        metrics_dirs = set()
        for pid in gateways:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            metrics_dirs.add(env[b"PROMETHEUS_MULTIPROC_DIR"].decode())
        assert len(metrics_dirs) == 1
        (metrics_dir,) = metrics_dirs
        per_process = []  # each process's own file, read alone with prometheus-client
        for pid in gateways:
            with tempfile.TemporaryDirectory() as one:
                shutil.copy(os.path.join(metrics_dir, f"counter_{pid}.db"), one)
                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=one)
                per_process.append(_metric(generate_latest(registry).decode(), SUCCESS))
        assert sum(per_process) == n and min(per_process) >= 1, per_process  # both served
        for _ in range(6):  # any process answers with the sum over both
            with httpx.Client(base_url=base, timeout=30) as http:
                text = http.get("/metrics").text
            assert _metric(text, SUCCESS) == n
            assert _metric(text, "vllm:generation_tokens_total") == 3 * n
            assert _metric(text, "vllm:num_requests_running") == 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    assert not os.path.exists(metrics_dir)  # serve removes the shared directory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_serve_internal_plaintext_with_api_key_and_admission_flags():
    """--internal-plaintext: the internal plane takes the shared token (env
    TANDEM_INTERNAL_TOKEN when set, else a random one) instead of certificates; --api-key
    guards the gateway and the router's gRPC API alike, out of every command line; the
    gateway's admission flags reach the gateway."""
    token, key = "test-internal-token", "test-api-key"
    env = {**os.environ, "TANDEM_INTERNAL_TOKEN": token}
    env.pop("TANDEM_API_KEY", None)
    flags = ["--prefill", "0", "--internal-plaintext", "--api-key", key]
    flags += ["--max-concurrent-requests", "3", "--queue-timeout-s", "2.5"]
    proc, port, line, rows = _start_serve(*flags, env=env)
    try:
        assert "internal plaintext + shared token" in line
        # the banner read the decode server's Stats with the token and the router's context
        # length with the API key
        assert rows["KV cache"].endswith(": 4,096 tokens (256 blocks of 16)"), rows["KV cache"]
        assert "0.50x requests of the full 8,192-token context" in rows["concurrency"]
        assert "TANDEM_INTERNAL_TOKEN" in rows["gRPC router"]
        children = _children(proc.pid)
        (gateway,) = [c for c in children.values() if " gateway " in c]
        assert (
            "--max-concurrent-requests 3 " in gateway + " " and "--queue-timeout-s 2.5" in gateway
        )
        assert "--max-queued-requests" not in gateway  # unset: the gateway's own default
        assert all(key not in c and "--tls-" not in c for c in children.values())
        assert all(" --host 127.0.0.1 " in c for c in children.values())

        base = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{base}/models", timeout=30).status_code == 401
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]

        router = line.split("router grpc ")[1].split(";")[0]
        for tls, api_key in ((PLAINTEXT, key), (TLSConfig(token=token), "")):
            with TandemClient(router, timeout=30, tls=tls, api_key=api_key, max_retries=0) as c:
                with pytest.raises(TandemError) as refused:
                    c.models()
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED.name
        with TandemClient(router, timeout=30, tls=TLSConfig(token=token), api_key=key) as c:
            assert c.models() == ["SmolLM2-135M-Instruct"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
