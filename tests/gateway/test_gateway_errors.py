"""A catalogue of bad requests: status, OpenAI error object, and the gateway keeps serving."""

import grpc
import httpx
import openai
import pytest

from gateway.errors import from_grpc

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
LONG = "Hello world " * 200  # > 256 tokens of context

CASES = [
    # (path, body or raw bytes, status, param, code)
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**CHAT, "temperature": 5}, 400, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p", None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**CHAT, "n": 1000}, 400, "n", None),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
    ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "messages"}, 400, "messages", None),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10000}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": [999999]}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs", None),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,param,code", CASES)
def test_bad_request(stack, path, body, status, param, code):
    url = stack["url"] + path
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == code
    # and the stack still serves
    ok = httpx.post(
        stack["url"] + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}
    )
    assert ok.status_code == 200


def test_openai_client_sees_typed_errors(stack):
    c = openai.OpenAI(base_url=stack["url"] + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=LONG)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny", messages=CHAT["messages"], stream=True, temperature=-1
        )
    assert e.value.param == "temperature"


def test_api_key(stack):
    url = stack["url_key"]
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.get(url + "/v1/models", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model="tiny", prompt="x", max_tokens=1).choices


def _rpc_error(code, trailing=()):
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "busy")


def test_overload_maps_to_429_and_503_with_retry_after():
    e = from_grpc(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, [("retry-after", "2")]))
    assert e.status == 429 and e.response().headers["retry-after"] == "2"
    e = from_grpc(_rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert e.status == 503 and e.response().headers["retry-after"] == "5"


def test_body_size_limit(stack):
    r = httpx.post(
        stack["url"] + "/v1/completions", json={"model": "tiny", "prompt": "x" * (5 << 20)}
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
