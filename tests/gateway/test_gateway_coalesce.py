"""The SSE writer's coalescing: the router chunks that queued up while the client lagged leave
as one write, one event per choice, with the same content as one event per chunk.

Real router chunks (router over fake workers), fed to the real builders once one chunk at a
time (a client that keeps up) and once as a single batch (a client that lagged for the whole
stream); the parsed events must carry the same text, per-token logprobs and finish reasons.
"""

import asyncio
import json

import grpc
import pytest

from gateway import openai_format as fmt
from gateway.config import GatewayConfig
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.translate import chat_to_proto, completion_to_protos
from protos import router_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def router_chunks(address: str, reqs) -> list[tuple[int, object]]:
    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            return [(i, c) for i, r in enumerate(reqs) async for c in stub.Generate(r)]

    return asyncio.run(go())


def events(sse: str) -> list[dict]:
    assert sse.endswith("\n\n")
    out = []
    for block in sse.split("\n\n")[:-1]:
        assert block.startswith("data: ")
        out.append(json.loads(block[len("data: ") :]))
    return out


def stream(builder, batches) -> list[dict]:
    sse = builder.stream_start()
    for batch in batches:
        if choices := builder.stream_batch(batch):
            sse += builder.sse(choices)
    return events(sse + builder.stream_end())


def per_choice(evs: list[dict], chat: bool) -> dict:
    out: dict = {}
    for e in evs:
        for c in e["choices"]:
            acc = out.setdefault(c["index"], {"text": "", "lp": None, "finish": []})
            acc["text"] += (c["delta"].get("content") or "") if chat else c["text"]
            if c["finish_reason"]:
                acc["finish"].append(c["finish_reason"])
            if c["logprobs"] is not None:
                if acc["lp"] is None:
                    acc["lp"] = [] if chat else {k: [] for k in c["logprobs"]}
                if chat:
                    acc["lp"] += c["logprobs"]["content"]
                else:
                    for k, v in c["logprobs"].items():
                        acc["lp"][k] += v
    return out


def check_same(body, reqs, chunks, kind: str):
    cls = fmt.ChatBuilder if kind == "chat" else fmt.CompletionBuilder
    one_by_one = stream(cls("id-1", "tiny", body.n, len(reqs), body), [[c] for c in chunks])
    merged = stream(cls("id-1", "tiny", body.n, len(reqs), body), [chunks])
    chat = kind == "chat"
    assert per_choice(merged, chat) == per_choice(one_by_one, chat)
    content = [e for e in merged if e["choices"] and "role" not in e["choices"][0].get("delta", {})]
    assert len(content) == body.n * len(reqs)  # one event per choice for the whole stream
    assert len(content) < len([e for e in one_by_one if e["choices"]])
    assert merged[-1]["usage"] == one_by_one[-1]["usage"]
    assert merged[-1]["usage"]["completion_tokens"] == sum(len(c.token_ids) for _, c in chunks)
    for e in merged:  # the fixed fields, as json.dumps(event) writes them
        assert (e["id"], e["model"], e["object"]) == ("id-1", "tiny", cls.chunk_object)
    return per_choice(merged, chat)


def test_chat_merged_events_keep_every_token_logprob(stack):
    body = ChatCompletionRequest.model_validate(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "stop": ["lazy"],
        }
    )
    reqs = [chat_to_proto(body, GatewayConfig(router=""))]
    chunks = router_chunks(stack["stack"].address, reqs)
    got = check_same(body, reqs, chunks, "chat")
    for i in (0, 1):
        assert got[i]["text"] == " The quick brown fox jumps over the "
        assert got[i]["finish"] == ["stop"]
        tokens = sum(len(c.token_ids) for _, c in chunks if c.index == i)
        assert len(got[i]["lp"]) == tokens  # one entry per token in the merged event
        assert all(len(e["top_logprobs"]) == 2 for e in got[i]["lp"])


def test_completions_merged_events_with_echo_and_prompt_batch(stack):
    body = CompletionRequest.model_validate(
        {
            "model": "tiny",
            "prompt": ["Hello", "Hi"],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 6,
            "logprobs": 1,
            "echo": True,
        }
    )
    reqs = completion_to_protos(body, GatewayConfig(router=""))
    chunks = router_chunks(stack["stack"].address, reqs)
    got = check_same(body, reqs, chunks, "completion")
    assert got[0]["text"] == "Hello The quick brown fox jumps over"
    assert got[1]["text"] == "Hi The quick brown fox jumps over"
    assert got[0]["lp"]["tokens"] == [" The", " quick", " brown", " fox", " jumps", " over"]
    assert got[0]["lp"]["text_offset"] == [5, 9, 15, 21, 25, 31]
    assert got[0]["finish"] == got[1]["finish"] == ["length"]
