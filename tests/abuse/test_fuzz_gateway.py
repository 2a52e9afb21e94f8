"""Property-based fuzzing of the gateway (hypothesis) in front of a real router and real
SmolLM2 prefill/decode servers: malformed JSON, wrong types, huge numbers, odd unicode, missing
and extra fields, on /v1/completions, /v1/chat/completions and /v1/models.

Property: no request gets a 5xx; every refusal is an OpenAI error object; every success is a
well-formed completion; afterwards all servers still serve. The examples are derandomized (the
same ones in every CI run); TANDEM_FUZZ_EXAMPLES scales their number for longer local runs.

What an accepted request may cost is bounded: max_tokens is always present and either invalid
or 1..2, prompts are short lists, and max_model_len is 256, so a fuzzed request that reaches
the model generates at most 2 tokens per choice.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time

import httpx
import pytest
from abuse_cluster import MAX_MODEL_LEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SCALE = float(os.environ.get("TANDEM_FUZZ_EXAMPLES", "1"))
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
STATS: collections.Counter = collections.Counter()  # (endpoint, status) -> requests
SECONDS: collections.Counter = collections.Counter()  # (endpoint, status) -> time spent


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


# -- strategies ---------------------------------------------------------------------------------

ODD_TEXT = st.sampled_from(
    ["", " ", "\x00", "\ud800", "\udfff", "\ufeff", "😀" * 50, "<|im_end|>", "<|im_start|>",
     "\u202e", "a\r\nb", "{{ raise_exception('x') }}", "{% for %}", "\\", '"', "x" * 3000]
)  # fmt: skip
TEXT = st.one_of(st.text(max_size=200), ODD_TEXT)
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)


def _costly(v) -> bool:
    """Would pydantic read v as a max_tokens worth generating for (3 .. max_model_len)?"""
    try:
        x = float(v) if isinstance(v, (int, float, str)) else math.nan
    except (ValueError, OverflowError):
        return False
    return 3 <= x < MAX_MODEL_LEN


MAX_TOKENS = st.one_of(st.integers(1, 2), JUNK.filter(lambda v: v is not None and not _costly(v)))


# Plausible values per field (mostly valid, some out of range); a body is drawn from these
# and then gets a few fields replaced by junk of any type, some removed, and extra keys.
SAMPLING = {
    "model": st.sampled_from(["smol", "smol", "nope", ""]),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2.5),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(-2, 100_000),
    "min_p": st.floats(0, 1.2),
    "presence_penalty": st.floats(-2.5, 2),
    "frequency_penalty": st.floats(-2, 2.5),
    "repetition_penalty": st.floats(0, 2),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=5)),
    "stop_token_ids": st.lists(st.integers(-1, 50_000), max_size=5),
    "logit_bias": st.dictionaries(
        st.one_of(st.integers(-1, 50_000).map(str), TEXT), st.floats(-100, 110), max_size=5
    ),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 3),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "user": TEXT,
}
# Internal-looking or unknown fields a client might try to set.
EXTRA = st.dictionaries(
    st.one_of(st.sampled_from(["request_id", "priority", "kv_transfer_params", "prefill_locally",
                               "handoff_id", "tools", "response_format", "best_of", "echo"]),
              st.text(max_size=12)),
    JUNK, max_size=3,
)  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "user", "assistant", "tool", "developer"]),
        "content": st.one_of(
            TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                           max_size=3)
        ),
    },
    optional={"name": TEXT},
)  # fmt: skip
PROMPT = st.one_of(
    TEXT,
    st.lists(TEXT, min_size=1, max_size=3),
    st.lists(st.integers(-1, 50_000), min_size=1, max_size=20),
    st.lists(st.lists(st.integers(0, 50_000), min_size=1, max_size=10), max_size=3),
)


@st.composite
def bodies(draw, required: dict, optional: dict):
    """A plausible body, then: some fields junk, some dropped, extra keys (max_tokens stays)."""
    body = draw(st.fixed_dictionaries(required, optional=optional))
    names = sorted(set(required) | set(optional))
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        if draw(st.booleans()):
            body[name] = draw(JUNK)
        else:
            body.pop(name, None)
    if draw(st.integers(0, 3)) == 0:
        body.update(draw(EXTRA))
    body["max_tokens"] = draw(MAX_TOKENS)
    return body


CHAT_BODIES = bodies(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=4)},
    {**SAMPLING, "max_completion_tokens": MAX_TOKENS, "logprobs": st.booleans(),
     "top_logprobs": st.integers(0, 22), "add_generation_prompt": st.booleans()},
)  # fmt: skip
COMPLETION_BODIES = bodies(
    {"prompt": PROMPT},
    {**SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 22), "suffix": st.just("")},
)  # fmt: skip


def encoded(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def raw_bodies(draw):
    """Bytes that are not (quite) a JSON request: truncated, mangled, nested, random."""
    kind = draw(st.sampled_from(["binary", "truncated", "mangled", "nested", "scalar"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    base = encoded(draw(st.one_of(CHAT_BODIES, COMPLETION_BODIES)))
    if kind == "truncated":
        return base[: draw(st.integers(0, max(0, len(base) - 1)))]
    if kind == "mangled":
        i = draw(st.integers(0, len(base)))
        return base[:i] + draw(st.binary(min_size=1, max_size=8)) + base[i:]
    if kind == "nested":
        depth = draw(st.integers(100, 100_000))
        return b'{"prompt":' + b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    return encoded(draw(JUNK))


# -- the property -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(cluster):
    url, proc = cluster.gateway(cluster.main_router)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, proc, cluster
    summary = {f"{p} {s}": f"{n} ({SECONDS[p, s]:.1f}s)" for (p, s), n in sorted(STATS.items())}
    print(f"\nfuzz: {sum(STATS.values())} requests; by endpoint and status: {summary}")


def check(client: httpx.Client, method: str, path: str, content=None, headers=None):
    t0 = time.monotonic()
    r = client.request(method, path, content=content, headers=headers)
    STATS[(path, r.status_code)] += 1
    SECONDS[(path, r.status_code)] += time.monotonic() - t0
    assert r.status_code < 500, (r.status_code, r.text[:500], content[:500] if content else None)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        if r.status_code in (429, 503):
            assert r.headers.get("retry-after")
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", r.text[-300:]
        for e in events[:-1]:
            assert "choices" in json.loads(e.removeprefix("data: ")), e  # no error events
    elif path != "/v1/models":
        reasons = {c["finish_reason"] for c in r.json()["choices"]}
        assert reasons and reasons <= {"stop", "length"}, r.text
    return r


JSON = {"content-type": "application/json"}


@settings(max_examples=examples(200), **SETTINGS)
@given(body=CHAT_BODIES)
def test_fuzz_chat(gateway, body):
    check(gateway[0], "POST", "/v1/chat/completions", encoded(body), JSON)


@settings(max_examples=examples(200), **SETTINGS)
@given(body=COMPLETION_BODIES)
def test_fuzz_completions(gateway, body):
    check(gateway[0], "POST", "/v1/completions", encoded(body), JSON)


@settings(max_examples=examples(150), **SETTINGS)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    content=raw_bodies(),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; x"]),
)
def test_fuzz_raw_bodies(gateway, path, content, content_type):
    check(gateway[0], "POST", path, content, {"content-type": content_type})


@settings(max_examples=examples(50), **SETTINGS)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    query=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    content=st.binary(max_size=100),
)
def test_fuzz_models(gateway, method, query, content):
    client = gateway[0]
    r = client.request(method, "/v1/models", params=query, content=content)
    STATS[("/v1/models", r.status_code)] += 1
    assert r.status_code < 500 and (r.status_code >= 400 or r.json()["data"][0]["id"] == "smol")


def test_servers_still_serve_after_fuzzing(gateway):
    client, proc, cluster = gateway
    assert proc.poll() is None and all(p.poll() is None for p in cluster.procs)
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "smol",
            "messages": [{"role": "user", "content": "Hi!"}],
            "max_tokens": 4,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert sum(STATS.values()) >= examples(200) * 2 + examples(150)
