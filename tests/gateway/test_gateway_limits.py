"""Every gateway limit: the status, the OpenAI error object with `param`, a refusal counted in
/metrics, nothing dispatched to the workers, and the gateway serves normally afterwards."""

import socket
import time

import httpx
import pytest

from gateway.config import GatewayConfig

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
I32 = 2**31

LIMITS = [
    # (id, path, body, status, param) against the default limits
    ("n", "/v1/completions", {**COMP, "n": 17}, "n"),
    ("n-int32", "/v1/completions", {**COMP, "n": I32}, "n"),
    ("max_tokens", "/v1/completions", {**COMP, "max_tokens": (1 << 20) + 1}, "max_tokens"),
    ("max_tokens-huge", "/v1/completions", {**COMP, "max_tokens": 10**30}, "max_tokens"),
    ("max_completion_tokens", "/v1/chat/completions",
     {**CHAT, "max_completion_tokens": (1 << 20) + 1}, "max_completion_tokens"),
    ("stop-count", "/v1/completions", {**COMP, "stop": list("abcde")}, "stop"),
    ("stop-len", "/v1/completions", {**COMP, "stop": ["x" * 257]}, "stop"),
    ("stop-empty", "/v1/completions", {**COMP, "stop": [""]}, "stop"),
    ("stop_token_ids-count", "/v1/completions", {**COMP, "stop_token_ids": [5] * 257},
     "stop_token_ids"),
    ("stop_token_ids-int32", "/v1/completions", {**COMP, "stop_token_ids": [I32]},
     "stop_token_ids"),
    ("logprobs", "/v1/completions", {**COMP, "logprobs": 21}, "logprobs"),
    ("top_logprobs", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("top_logprobs-alone", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("prompt-chars", "/v1/completions", {**COMP, "prompt": "x" * ((1 << 20) + 1)}, "prompt"),
    ("prompt-count", "/v1/completions", {**COMP, "prompt": ["a"] * 65}, "prompt"),
    ("prompt-token-int32", "/v1/completions", {**COMP, "prompt": [I32]}, "prompt"),
    ("chat-chars", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x" * (1 << 19) + "y"}] * 2}, "messages"),
    ("messages-count", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "a"}] * 1025}, "messages"),
    ("logit_bias-size", "/v1/completions",
     {**COMP, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("logit_bias-key", "/v1/completions", {**COMP, "logit_bias": {str(I32): 1}}, "logit_bias"),
    ("top_k-int32", "/v1/completions", {**COMP, "top_k": I32}, "top_k"),
    ("min_tokens-int32", "/v1/completions", {**COMP, "min_tokens": I32}, "min_tokens"),
    ("seed-int64", "/v1/completions", {**COMP, "seed": 2**63}, "seed"),
    ("tools-count", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "tools"),
    ("response_format-size", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
         "name": "s", "schema": {"description": "x" * (64 << 10)}}}}, "response_format"),
    ("two-constraints", "/v1/completions",
     {**COMP, "guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ("prompt_logprobs", "/v1/completions", {**COMP, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("suffix", "/v1/completions", {**COMP, "suffix": "tail"}, "suffix"),
]  # fmt: skip


def _refused(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tandem:gateway_refused_requests_total")
    )


def _dispatched(stack) -> int:
    return sum(len(f.state.requests) for f in stack["stack"].decodes)


def _assert_error(r, status, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


@pytest.mark.parametrize("path,body,param", [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_limit(stack, path, body, param):
    url = stack["url"]
    refused, dispatched = _refused(url), _dispatched(stack)
    _assert_error(httpx.post(url + path, json=body, timeout=30), 400, param)
    assert _dispatched(stack) == dispatched  # refused before any work reached a worker
    assert _refused(url) == refused + 1
    ok = httpx.post(url + "/v1/completions", json=COMP, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_off_values_of_unsupported_fields_are_accepted(stack):
    body = {**CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
    assert httpx.post(stack["url"] + "/v1/chat/completions", json=body).status_code == 200


def test_unknown_and_internal_fields_never_reach_the_router(stack):
    # Unknown keys are ignored by default; internal ones (the router's request_id, a
    # priority, KV handoff parameters) are not forwarded: the workers never see them.
    body = {**COMP, "request_id": "client-chosen", "priority": -100,
            "kv_transfer_params": {"handoff_id": "h0"}, "prefill_locally": True}  # fmt: skip
    before = {r for f in stack["stack"].decodes for r in f.state.requests}
    r = httpx.post(stack["url"] + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    new = {r for f in stack["stack"].decodes for r in f.state.requests} - before
    assert len(new) == 1 and not any("client-chosen" in x for x in new)
    assert not r.json()["id"].startswith("client-chosen")


@pytest.fixture(scope="module")
def strict(stack, make_gateway):
    return make_gateway(
        GatewayConfig(router=stack["stack"].address, reject_unknown_fields=True,
                      max_body_bytes=4096, max_n=2)
    )  # fmt: skip


def test_reject_unknown_fields(strict):
    r = httpx.post(strict + "/v1/completions", json={**COMP, "request_id": "x"})
    _assert_error(r, 400, "request_id")
    r = httpx.post(strict + "/v1/completions", json={**COMP, "n": 3})
    _assert_error(r, 400, "n")
    assert httpx.post(strict + "/v1/completions", json=COMP).status_code == 200


def test_body_limit_from_content_length_without_reading_the_body(strict):
    # Claim a 1 GiB body, send 10 bytes of it: the 413 comes at once, from the header alone.
    port = int(strict.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 1073741824\r\n\r\n{"prompt":'
        )
        t0 = time.monotonic()
        reply = s.recv(65536).decode()
        assert time.monotonic() - t0 < 2
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and "connection: close" in head.lower()
    assert '"code":"request_too_large"' in body


def test_body_limit_chunked(strict):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(strict + "/v1/completions", content=chunks())  # no Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(strict + "/v1/completions", json=COMP).status_code == 200


def test_unknown_routes_and_methods_get_openai_errors(stack):
    r = httpx.get(stack["url"] + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(stack["url"] + "/v1/models", json={})
    assert r.status_code == 405 and r.json()["error"]["message"]
