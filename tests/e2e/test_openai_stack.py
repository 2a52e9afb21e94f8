"""The whole stack in real processes, driven by the real `openai` client."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import grpc
import httpx
import openai
import pytest

from protos import worker_pb2, worker_pb2_grpc
from tandem import SamplingParams

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL_NAME = "SmolLM2-135M-Instruct"


def wait_until(fn, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n",
    "Water boils at",
    "My favourite food is",
    "1, 2, 3, 4,",
]


def _client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def _stats(address: str) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(address) as ch:
        try:
            return worker_pb2_grpc.PrefillStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
        except grpc.RpcError:
            return worker_pb2_grpc.DecodeStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


def test_completions_greedy_equal_offline_generate(stack, reference_llm):
    client = _client(stack)
    want = reference_llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False
    )
    for prompt, ref in zip(PROMPTS, want, strict=True):
        resp = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0
        )
        assert resp.choices[0].text == ref.outputs[0].text, prompt
        assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_chat_stream_and_not_agree_and_match_offline_chat(stack, reference_llm):
    client = _client(stack)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = reference_llm.chat(
        messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False
    )[0]
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=32, temperature=0
    )
    assert resp.choices[0].message.content == ref.outputs[0].text
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert (
        usage_chunk.usage.total_tokens
        == usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )


def test_n_two_returns_two_choices(stack):
    resp = _client(stack).completions.create(
        model=MODEL_NAME, prompt="Tell me a story:", max_tokens=8, temperature=1.0, n=2, seed=7
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.text for c in resp.choices)


def test_32_concurrent_streams_complete_correctly(stack, reference_llm):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(32)]
    want = reference_llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False
    )
    client = _client(stack)

    def one(prompt):
        stream = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    with cf.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    assert got == [w.outputs[0].text for w in want]


def test_shared_prefix_lands_on_one_prefill_server(stack):
    client = _client(stack)
    before = [_stats(a) for a in stack.prefill]
    system = "You are a meticulous assistant. " * 24  # several full blocks
    for i in range(4):
        client.completions.create(
            model=MODEL_NAME, prompt=f"{system} Question {i}: why?", max_tokens=2, temperature=0
        )
    after = [_stats(a) for a in stack.prefill]
    queried = [
        a.prefix_cache_queries - b.prefix_cache_queries for a, b in zip(after, before, strict=True)
    ]
    hits = [a.prefix_cache_hits - b.prefix_cache_hits for a, b in zip(after, before, strict=True)]
    assert sorted(q > 0 for q in queried) == [False, True], queried  # one server took them all
    assert max(hits) >= 3 * 16 * 3  # the three later requests reused the shared blocks


def test_cancel_mid_stream_frees_blocks_everywhere(stack):
    client = _client(stack)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="Count slowly: one,",
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()

    def idle():
        stats = [_stats(a) for a in stack.prefill + stack.decode]
        return all(s.num_free_blocks == s.num_total_blocks and s.num_running == 0 for s in stats)

    assert wait_until(idle, timeout=10)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model"),
        ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": MODEL_NAME, "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": MODEL_NAME, "prompt": "hi " * 9000, "max_tokens": 4}, 400, None),
        ({"model": MODEL_NAME, "prompt": 5}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors_and_stack_keeps_serving(stack, body, status, param):
    url = stack.base_url + "/completions"
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param:
        assert err["param"] == param
    ok = httpx.post(url, json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_malformed_json_and_empty_messages(stack):
    r = httpx.post(
        stack.base_url + "/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(stack.base_url + "/chat/completions", json={"model": MODEL_NAME, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_gateway_and_router_processes_never_load_torch(stack):
    _client(stack).completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    for proc in (stack.gateway_proc, stack.router_proc):
        assert "libtorch" not in _maps(proc.pid)
