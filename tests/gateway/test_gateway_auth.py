"""`tandem gateway` as a process with TANDEM_API_KEY: every route but the probes (/health,
/ready, /live) needs `Authorization: Bearer KEY`; refusals are OpenAI error objects and come
before the body is read or the route is looked up. No router runs, so an authorized call gets
a fast 503, and so do the readiness probes."""

import os
import subprocess
import sys

import httpx
import pytest

from gateway.config import GatewayConfig
from rpc.procs import free_port, wait_http_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def gateway():
    port, dead_router = free_port("127.0.0.1"), free_port("127.0.0.1")
    env = {**os.environ, "TANDEM_API_KEY": "sekret"}
    cmd = [sys.executable, "-m", "tandem_cli.main", "gateway", "--port", str(port),
           "--router", f"127.0.0.1:{dead_router}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http_healthy(url + "/live", proc, 30)  # /health waits for a router: none here
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong", "Bearer sekret2", "Bearer sekre", "Basic sekret", "sekret", "Bearer"],
)
@pytest.mark.parametrize(
    "method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                    ("POST", "/v1/chat/completions"), ("GET", "/v1/unknown")],
)  # fmt: skip
def test_refused_without_the_key(gateway, header, method, path):
    headers = {"authorization": header} if header else {}
    r = httpx.request(method, gateway + path, headers=headers, json={"prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"] == {
        "message": "Incorrect or missing API key.", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key",
    }  # fmt: skip


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_the_key_from_the_environment_opens_every_route(gateway, scheme):
    headers = {"authorization": f"{scheme} sekret"}
    # the probes are open without a key; no router: alive but not ready
    assert httpx.get(gateway + "/live").status_code == 200
    assert (
        httpx.get(gateway + "/health").status_code
        == httpx.get(gateway + "/ready").status_code
        == 503
    )
    assert httpx.get(gateway + "/metrics", headers=headers).status_code == 200
    # past auth; the router is down, so a quick 503 with Retry-After
    r = httpx.post(gateway + "/v1/completions", headers=headers, json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "unavailable"
    r = httpx.get(gateway + "/v1/models", headers=headers)
    assert r.status_code == 503


def test_auth_comes_before_the_body(gateway):
    # an unauthenticated client cannot make the gateway read (or refuse by size) its body
    r = httpx.post(
        gateway + "/v1/completions", content=b"x" * (5 << 20), headers={"authorization": "x"}
    )
    assert r.status_code == 401


def test_every_limit_is_a_flag():
    out = subprocess.run(
        [sys.executable, "-m", "tandem_cli.main", "gateway", "--help"], capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    for name in GatewayConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out, name
