"""The gateway's side of the trust boundary, against real routers on 127.0.0.1: model names
(the real openai client), readiness that follows the router, and the API key passed on."""

import time

import grpc
import httpx
import openai
import pytest
from router_fakes import LoopThread, start_stack

from gateway.config import GatewayConfig
from protos import router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.server import start_router
from rpc.procs import free_port

pytestmark = pytest.mark.timeout(60)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_model_names(stack, kind):
    client, url = _client(stack["url"]), stack["url"]

    def create(**kw):
        if kind == "chat":
            messages = [{"role": "user", "content": "hi"}]
            return client.chat.completions.create(messages=messages, max_tokens=2, **kw)
        return client.completions.create(prompt="x", max_tokens=2, **kw)

    for model in ("m" * 100_000, ""):  # never 429 (clients retry that), never 404
        with pytest.raises(openai.BadRequestError) as e:
            create(model=model)
        assert e.value.status_code == 400
        assert e.value.body["param"] == "model" and e.value.body["type"] == "invalid_request_error"
        assert len(e.value.body["message"]) < 200
    with pytest.raises(openai.NotFoundError) as e:
        create(model="gpt-4")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert create(model="tiny").choices
    # no `model` at all: the served model (vLLM, OpenAI-compatible clients)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = {"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "x"}
    r = httpx.post(url + path, json={**body, "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"]


def test_models_show_no_path(stack, model_dir):
    r = httpx.get(stack["url"] + "/v1/models", timeout=10)
    (card,) = r.json()["data"]
    assert card["id"] == card["root"] == "tiny"
    assert str(model_dir) not in r.text and "127.0.0.1" not in r.text


def _status(url: str) -> tuple[int, int, int]:
    return tuple(httpx.get(url + p, timeout=5).status_code for p in ("/health", "/ready", "/live"))


def _until(url: str, want: tuple[int, int, int], timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while (got := _status(url)) != want:
        assert time.monotonic() - t0 < timeout, f"probes {got}, want {want}"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_health_follows_the_router(model_dir, make_gateway):
    lt = LoopThread()
    port = free_port("127.0.0.1")
    config = RouterConfig(model=str(model_dir), served_model_name="tiny", port=port)
    try:
        router = lt.run(start_router(config))
        url = make_gateway(GatewayConfig(router=f"127.0.0.1:{port}", api_key="sekret"))
        _until(url, (200, 200, 200))  # open without the key
        lt.run(router.stop(None))
        down_s = _until(url, (503, 503, 200))  # alive, not ready
        r = httpx.get(url + "/health", timeout=5)
        assert r.json()["error"]["code"] == "unavailable"
        router = lt.run(start_router(config))  # back at the same address
        _until(url, (200, 200, 200))
        lt.run(router.stop(None))
    finally:
        lt.close()
    assert down_s < 5  # the cached answer lives about a second


def test_gateway_sends_its_api_key_to_the_router(model_dir, script, make_gateway):
    lt = LoopThread()
    try:
        st = lt.run(start_stack(model_dir, script, api_key="sekret"))

        async def unkeyed():
            async with grpc.aio.insecure_channel(st.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                try:
                    await stub.ListModels(router_pb2.ListModelsRequest())
                except grpc.aio.AioRpcError as e:
                    return e.code()

        try:
            assert lt.run(unkeyed()) == grpc.StatusCode.UNAUTHENTICATED  # the router enforces
            url = make_gateway(GatewayConfig(router=st.address, api_key="sekret"))
            client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
            assert [m.id for m in client.models.list()] == ["tiny"]
            out = client.completions.create(model="tiny", prompt="x", max_tokens=3)
            assert out.choices[0].text and out.usage.completion_tokens == 3
        finally:
            lt.run(st.stop())
    finally:
        lt.close()
