"""Real processes on 127.0.0.1: fake workers, `python -m router`, `python -m gateway`, and the
openai client; the processes never map torch, and SIGTERM shuts them down cleanly."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from router_fakes import EOS, write_model_dir

from router.tokenizer import RouterTokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def wait_for(check, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.1)
    raise TimeoutError(check)


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    model_dir = write_model_dir(tmp_path_factory.mktemp("tiny_e2e"))
    script = RouterTokenizer(model_dir).encode(" The quick brown fox jumps") + [EOS]
    procs = []
    try:
        fakes = spawn(["tests/router/router_fakes.py", "2", "1", "0.001", *map(str, script)])
        procs.append(fakes)
        prefill_a, prefill_b, decode = json.loads(fakes.stdout.readline())
        rport, mport, gport = free_port(), free_port(), free_port()
        router = spawn(
            ["-m", "router", "--model", str(model_dir), "--served-model-name", "tiny",
             "--port", str(rport), "--metrics-port", str(mport), "--prefill", prefill_a,
             "--prefill", prefill_b, "--decode", decode],
        )  # fmt: skip
        procs.append(router)

        def router_up():
            with grpc.insecure_channel(f"127.0.0.1:{rport}") as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return r.status == health_pb2.HealthCheckResponse.SERVING

        wait_for(router_up)
        gateway = spawn(["-m", "gateway", "--port", str(gport), "--router", f"127.0.0.1:{rport}"])
        procs.append(gateway)
        url = f"http://127.0.0.1:{gport}"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200)
        yield {"url": url, "metrics": f"http://127.0.0.1:{mport}/metrics", "router": router,
               "gateway": gateway}  # fmt: skip
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)


def test_openai_client_through_real_processes(processes):
    client = openai.OpenAI(base_url=processes["url"] + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]

    def one(i):
        stream = client.chat.completions.create(model="tiny", messages=msgs, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == [" The quick brown fox jumps"] * 16
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert r.choices[0].text == " The quick"
    metrics = httpx.get(processes["metrics"]).text
    for name in ("vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "tandem:kv_transfer_time_seconds",
                 "tandem:first_token_delivery_seconds", "tandem:routed_requests_total"):  # fmt: skip
        assert name in metrics


def test_processes_do_not_map_torch_and_stop_on_sigterm(processes):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc")
    for name in ("router", "gateway"):
        assert not maps_torch(processes[name].pid)
    for name in ("gateway", "router"):
        p = processes[name]
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
