"""The real `openai` client against a real uvicorn gateway over a router on fake workers."""

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(60)

TEXT = " The quick brown fox jumps over the lazy dog."
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0)


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS)
    assert r.choices[0].message.content == TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 5 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_non_streaming_and_streaming(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].text == " The quick brown"
    chunks = list(
        client.completions.create(model="tiny", prompt="Hello", max_tokens=3, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == " The quick brown"


def test_n2_and_prompt_batches(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, n=2, max_tokens=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content == " The quick"
    assert r.usage.completion_tokens == 4
    r = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, n=2, stream=True))
    for i in (0, 1):
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
            == TEXT
        )


def test_stop_strings_and_seed(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, stop=["fox", "zzz"], seed=7)
    assert r.choices[0].message.content == " The quick brown "
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_formats(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=2, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [" The", " quick"]
    assert len(content[0].top_logprobs) == 2 and content[0].bytes == list(b" The")
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "Hello The quick"
    assert lp.tokens == [" The", " quick"] and lp.text_offset == [5, 9]


def test_models_health_metrics(stack, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(stack["url"] + "/health").status_code == 200
    metrics = httpx.get(stack["url"] + "/metrics").text
    assert "vllm:e2e_request_latency_seconds" in metrics
    assert "vllm:generation_tokens_total" in metrics


def test_client_disconnect_aborts_on_workers(stack):
    st = stack["stack"]
    before = len(st.decodes[0].state.aborted)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
    # 200 tokens at 50 ms: the stream cannot finish before the disconnect is noticed (at the
    # stack's 2 ms a loaded machine let it complete first, and coalescing lets a lagging
    # stream catch up in one message, so then nothing was left to abort)
    delay, st.decodes[0].state.token_delay_s = st.decodes[0].state.token_delay_s, 0.05
    try:
        with httpx.stream("POST", stack["url"] + "/v1/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(st.decodes[0].state.aborted) == before:
            time.sleep(0.02)
    finally:
        st.decodes[0].state.token_delay_s = delay
    assert len(st.decodes[0].state.aborted) == before + 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and st.decodes[0].state.active:
        time.sleep(0.02)
    assert st.decodes[0].state.active == set()
    assert st.prefills[0].state.aborted[-1] == st.decodes[0].state.aborted[-1]
