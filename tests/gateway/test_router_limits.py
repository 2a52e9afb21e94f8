"""The router's own size bounds, for gRPC clients that bypass the gateway: INVALID_ARGUMENT with
the field in the "param" trailer, before tokenizing and before any worker sees the request."""

import grpc
import pytest

from protos import common_pb2, router_pb2, router_pb2_grpc
from router import validate

pytestmark = pytest.mark.timeout(60)


def _text(**kw):
    return router_pb2.GenerateRequest(text="hi", **kw)


def _sampling(**kw):
    return common_pb2.SamplingParams(max_tokens=2, **kw)


def _chat(messages):
    return router_pb2.GenerateRequest(
        chat=router_pb2.ChatMessages(messages=messages), sampling=_sampling()
    )


MSG = router_pb2.ChatMessage(role="user", content="hi")
CASES = [
    ("prompt-chars", "prompt",
     router_pb2.GenerateRequest(text="x" * (validate.MAX_PROMPT_CHARS + 1), sampling=_sampling())),
    ("chat-chars", "messages",
     _chat([router_pb2.ChatMessage(role="user", content="x" * (validate.MAX_PROMPT_CHARS // 2))] * 3)),
    ("messages", "messages", _chat([MSG] * (validate.MAX_MESSAGES + 1))),
    ("stop-len", "stop", _text(stop=["x" * (validate.MAX_STOP_LEN + 1)], sampling=_sampling())),
    ("stop_token_ids", "stop_token_ids",
     _text(sampling=_sampling(stop_token_ids=[5] * (validate.MAX_STOP_TOKEN_IDS + 1)))),
    ("logit_bias", "logit_bias",
     _text(sampling=_sampling(logit_bias={i: 1.0 for i in range(validate.MAX_LOGIT_BIAS + 1)}))),
]  # fmt: skip


@pytest.mark.parametrize("param,request_", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_router_limit(stack, param, request_):
    dispatched = sum(len(f.state.requests) for f in stack["stack"].decodes)
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(stack["stack"].address, options=options) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request_, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(e.value.trailing_metadata())["param"] == param
        assert sum(len(f.state.requests) for f in stack["stack"].decodes) == dispatched
        ok = list(stub.Generate(_text(sampling=_sampling()), timeout=30))
        assert ok[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
