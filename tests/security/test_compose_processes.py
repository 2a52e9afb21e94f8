"""compose.yaml's layout run as local processes (compose_processes.py): certificates from its
`certs` service, router, one prefill, one decode and the gateway with compose's commands and
environment, each up once its own compose health check passes. The gateway serves a chat
completion to the openai client; the router's port refuses a plaintext gRPC client in the
TLS handshake and answers a client holding a certificate from the stack's CA."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rpc.tls import channel
from tandem.loader.default_model import resolve_model_dir

# --import-mode=importlib: the helper beside this file is imported by name
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compose_processes import ComposeProcesses  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL_NAME = "SmolLM2-135M-Instruct"  # compose.yaml's default --served-model-name


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory):
    with ComposeProcesses.start(resolve_model_dir(None), tmp_path_factory.mktemp("compose")) as s:
        yield s


def _health(address: str, tls) -> health_pb2.HealthCheckResponse:
    with channel(address, tls, peer_role="router") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_chat_completion_through_the_gateway(compose_stack):
    client = openai.OpenAI(
        base_url=compose_stack.base_url, api_key="none", max_retries=0, timeout=120
    )
    resp = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    assert resp.choices[0].message.content.strip()
    assert resp.usage.completion_tokens >= 1
    # the workers registered themselves over mutual TLS and the request crossed them
    for worker in ("prefill", "decode"):
        assert "Traceback" not in compose_stack.log(worker), worker


def test_router_refuses_plaintext_in_the_handshake(compose_stack):
    router = compose_stack.address("router")
    with grpc.insecure_channel(router) as ch:
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # the same port, a client with the gateway's certificate: it is TLS, not a dead port
    resp = _health(router, compose_stack.tls("gateway"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
