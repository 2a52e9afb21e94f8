"""The gateway's OpenAI surface for structured outputs, tools, reasoning and prompt logprobs,
both ways: the real `openai` client -> real gateway -> the GenerateRequest a router receives,
and the router's GenerateResponse chunks -> what the client reads.

The router here is a scripted grpc.aio Router servicer on 127.0.0.1 (the gateway is the part
under test): it records every request and answers with the chunks a test sets, or with the
error the router gives for a bad constraint (INVALID_ARGUMENT, param "structured_outputs").
"""

import json
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from gateway.config import GatewayConfig
from protos import common_pb2, router_pb2, router_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "router"))
from router_fakes import LoopThread  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MODEL = "scripted-model"
MSGS = [{"role": "user", "content": "hi"}]
STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH
USAGE = common_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)


class ScriptedRouter(router_pb2_grpc.RouterServicer):
    def __init__(self):
        self.requests: list[router_pb2.GenerateRequest] = []
        self.chunks: list[router_pb2.GenerateResponse] = []
        self.error: tuple[grpc.StatusCode, str, str] | None = None

    async def Generate(self, request, context):
        self.requests.append(request)
        if self.error is not None:
            code, message, param = self.error
            await context.abort(code, message, trailing_metadata=(("param", param),))
        chunks = self.chunks or [
            router_pb2.GenerateResponse(text="ok", finish_reason=STOP, usage=USAGE)
        ]
        for n in range(max(1, request.n)):
            for c in chunks:
                out = router_pb2.GenerateResponse()
                out.CopyFrom(c)
                out.index = n
                yield out

    async def ListModels(self, request, context):
        return router_pb2.ListModelsResponse(
            models=[router_pb2.ModelCard(id=MODEL, max_model_len=64, root=MODEL)]
        )


async def _start(servicer):
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture(scope="module")
def router(make_gateway):
    lt = LoopThread()
    servicer = ScriptedRouter()
    server, port = lt.run(_start(servicer))
    servicer.url = make_gateway(GatewayConfig(router=f"127.0.0.1:{port}", max_logprobs=5))
    yield servicer
    lt.run(server.stop(0))
    lt.close()


@pytest.fixture
def fake(router):
    router.requests.clear()
    router.chunks, router.error = [], None
    return router


@pytest.fixture
def client(router):
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)


def _post(fake, path, body):
    return httpx.post(fake.url + path, json=body, timeout=30)


def _assert_400(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"]


# ---------------------------------------------------------------------------------------------
# Requests: OpenAI / vLLM fields -> SamplingParams.structured


class Person(BaseModel):
    name: str
    age: int


def test_parse_with_a_pydantic_model_sends_its_schema(fake, client):
    fake.chunks = [
        router_pb2.GenerateResponse(text='{"name": "Ada", ', token_ids=[1]),
        router_pb2.GenerateResponse(text='"age": 36}', finish_reason=STOP, usage=USAGE),
    ]
    r = client.chat.completions.parse(model=MODEL, messages=MSGS, response_format=Person)
    assert r.choices[0].message.parsed == Person(name="Ada", age=36)
    sent = fake.requests[-1].sampling.structured
    assert sent.WhichOneof("kind") == "json_schema"
    # exactly the schema the openai client derives from the model
    assert json.loads(sent.json_schema) == to_strict_json_schema(Person)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MAPPING = [
    # (request fields, StructuredOutput the router must receive)
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     {"json_schema": SCHEMA}),
    ({"guided_json": SCHEMA}, {"json_schema": SCHEMA}),
    ({"guided_json": json.dumps(SCHEMA)}, {"json_schema": SCHEMA}),
    ({"guided_regex": r"\d{3}"}, {"regex": r"\d{3}"}),
    ({"guided_choice": ["yes", "no"]}, {"choice": {"choices": ["yes", "no"]}}),
    ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
    ({"structured_outputs": {"json": SCHEMA}}, {"json_schema": SCHEMA}),
    ({"structured_outputs": {"regex": "a+"}}, {"regex": "a+"}),
    ({"structured_outputs": {"choice": ["x"]}}, {"choice": {"choices": ["x"]}}),
    ({"structured_outputs": {"grammar": "root ::= [a-z]+"}}, {"grammar": "root ::= [a-z]+"}),
    ({"structured_outputs": {"json_object": True}}, {"json_object": True}),
    ({"structured_outputs": {"structural_tag": {"type": "structural_tag"}}},
     {"structural_tag": {"type": "structural_tag"}}),
    ({"response_format": {"type": "text"}}, {}),
    ({}, {}),
]  # fmt: skip


def _as_dict(so: common_pb2.StructuredOutput) -> dict:
    kind = so.WhichOneof("kind")
    if kind is None:
        return {}
    if kind == "choice":
        return {"choice": {"choices": list(so.choice.choices)}}
    value = getattr(so, kind)
    return {kind: json.loads(value) if kind in ("json_schema", "structural_tag") else value}


@pytest.mark.parametrize("fields,expected", MAPPING, ids=[str(m[0])[:60] for m in MAPPING])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_constraint_fields_map_to_structured(fake, path, fields, expected):
    body = {"messages": MSGS} if "chat" in path else {"prompt": "hi"}
    r = _post(fake, path, {**body, **fields})
    assert r.status_code == 200, r.text
    assert _as_dict(fake.requests[-1].sampling.structured) == expected


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_json": SCHEMA, "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_grammar": "g", "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"json": "[1,"}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_regex": "a" * (64 << 10) + "a"}, "guided_regex"),
        ({"guided_choice": ["a" * (32 << 10), "b" * (32 << 10) + "b"]}, "guided_choice"),
    ],
)
def test_bad_or_second_constraint_is_refused_naming_the_field(fake, fields, param):
    _assert_400(_post(fake, "/v1/chat/completions", {"messages": MSGS, **fields}), param)
    assert fake.requests == []  # refused before the router


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
         "response_format"),
        ({"guided_json": SCHEMA}, "guided_json"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"structured_outputs": {"grammar": "x"}}, "structured_outputs"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
def test_router_constraint_errors_name_the_field_the_client_used(fake, fields, param, stream):
    fake.error = (grpc.StatusCode.INVALID_ARGUMENT, "invalid schema", "structured_outputs")
    body = {"messages": MSGS, "stream": stream, **fields}
    _assert_400(_post(fake, "/v1/chat/completions", body), param)
    fake.error = (grpc.StatusCode.INVALID_ARGUMENT, "bad tool_choice", "tool_choice")
    _assert_400(_post(fake, "/v1/chat/completions", body), "tool_choice")


def test_invalid_schema_through_the_openai_client(fake, client):
    fake.error = (grpc.StatusCode.INVALID_ARGUMENT, "not a JSON Schema", "structured_outputs")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=MSGS, extra_body={"guided_json": {"type": 5}}
        )
    assert e.value.body["param"] == "guided_json"


# ---------------------------------------------------------------------------------------------
# Requests: tools, tool messages, template kwargs, prompt_logprobs, best_of

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}
NOARGS = {"type": "function", "function": {"name": "now"}}


def test_tools_and_tool_choice_map_to_the_proto(fake, client):
    named = {"type": "function", "function": {"name": "now"}}
    cases = [(None, None), ("none", "mode"), ("auto", "mode"), ("required", "mode"),
             (named, "function")]  # fmt: skip
    for choice, kind in cases:
        extra = {} if choice is None else {"tool_choice": choice}
        client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER, NOARGS], **extra)
        req = fake.requests[-1]
        assert [(t.name, t.description, json.loads(t.parameters_json), t.strict)
                for t in req.tools] == [
            ("get_weather", "Weather in a city", WEATHER["function"]["parameters"], True),
            ("now", "", {}, False),
        ]  # fmt: skip
        assert req.tool_choice.WhichOneof("choice") == kind
        if kind == "mode":
            assert req.tool_choice.mode == choice
        if kind == "function":
            assert req.tool_choice.function == "now"


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "now"}}},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "now"}}},
        {"tools": [WEATHER], "tool_choice": "sometimes"},
    ],
)
def test_bad_tool_choice_is_refused(fake, fields):
    _assert_400(_post(fake, "/v1/chat/completions", {"messages": MSGS, **fields}), "tool_choice")


def test_tool_limits(fake):
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    _assert_400(_post(fake, "/v1/chat/completions", {"messages": MSGS, "tools": many}), "tools")
    bad_name = [{"type": "function", "function": {"name": "no spaces"}}]
    _assert_400(_post(fake, "/v1/chat/completions", {"messages": MSGS, "tools": bad_name}), "tools")
    big = [{**WEATHER, "function": {**WEATHER["function"], "description": "x" * (1 << 20)}}]
    _assert_400(_post(fake, "/v1/chat/completions", {"messages": MSGS, "tools": big}), "tools")
    schema = {"type": "object", "description": "x" * (64 << 10)}
    big = [{**WEATHER, "function": {**WEATHER["function"], "parameters": schema}}]
    _assert_400(_post(fake, "/v1/chat/completions", {"messages": MSGS, "tools": big}), "tools")
    kwargs = {"chat_template_kwargs": {"x": "y" * (64 << 10)}}
    r = _post(fake, "/v1/chat/completions", {"messages": MSGS, **kwargs})
    _assert_400(r, "chat_template_kwargs")
    assert fake.requests == []


def test_tool_call_history_reasoning_and_template_kwargs(fake, client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "They want weather.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER],
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    req = fake.requests[-1]
    user, assistant, tool = req.chat.messages
    assert (user.role, user.content, list(user.tool_calls)) == ("user", "Weather in Paris?", [])
    assert not user.HasField("tool_call_id") and not user.HasField("reasoning_content")
    assert assistant.content == "" and assistant.reasoning_content == "They want weather."
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}')
    ]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "sunny")
    assert json.loads(req.chat_template_kwargs_json) == {"enable_thinking": False}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_prompt_logprobs_request(fake, path):
    body = {"messages": MSGS} if "chat" in path else {"prompt": "hi"}
    assert _post(fake, path, {**body, "prompt_logprobs": 3}).status_code == 200
    assert fake.requests[-1].sampling.prompt_logprobs == 3
    assert _post(fake, path, body).status_code == 200
    assert not fake.requests[-1].sampling.HasField("prompt_logprobs")
    n = len(fake.requests)
    _assert_400(_post(fake, path, {**body, "prompt_logprobs": 6}), "prompt_logprobs")
    _assert_400(_post(fake, path, {**body, "prompt_logprobs": 1, "stream": True}),
                "prompt_logprobs")  # fmt: skip
    assert len(fake.requests) == n


def test_best_of(fake):
    body = {"prompt": "hi", "n": 2}
    assert _post(fake, "/v1/completions", {**body, "best_of": 2}).status_code == 200
    _assert_400(_post(fake, "/v1/completions", {**body, "best_of": 3}), "best_of")
    _assert_400(_post(fake, "/v1/completions", {"prompt": "hi", "best_of": 2}), "best_of")


# ---------------------------------------------------------------------------------------------
# Responses: tool calls, reasoning, finish_reason, prompt_logprobs, the model name

Delta = router_pb2.ToolCallDelta
TOOL_CHUNKS = [
    router_pb2.GenerateResponse(reasoning_text="Need the ", token_ids=[1]),
    router_pb2.GenerateResponse(reasoning_text="weather.", token_ids=[2]),
    router_pb2.GenerateResponse(tool_calls=[Delta(index=0, id="call_a", name="get_weather",
                                                  arguments='{"city": ')]),
    router_pb2.GenerateResponse(tool_calls=[Delta(index=0, arguments='"Paris"}')]),
    router_pb2.GenerateResponse(tool_calls=[Delta(index=1, id="call_b", name="now",
                                                  arguments="{}")],
                                finish_reason=STOP, usage=USAGE),
]  # fmt: skip


def test_tool_calls_and_reasoning_non_streaming(fake, client):
    fake.chunks = TOOL_CHUNKS
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=[WEATHER, NOARGS])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == "Need the weather."
    assert [(c.id, c.type, c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [
        ("call_a", "function", "get_weather", {"city": "Paris"}),
        ("call_b", "function", "now", {}),
    ]  # fmt: skip


def test_tool_calls_streaming_accumulate_in_the_openai_helper(fake, client):
    fake.chunks = TOOL_CHUNKS
    with client.chat.completions.stream(
        model=MODEL, messages=MSGS, tools=[WEATHER, NOARGS]
    ) as stream:
        final = stream.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "now", "{}"),
    ]


def test_tool_call_deltas_on_the_wire(fake, client):
    fake.chunks = TOOL_CHUNKS
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MSGS, tools=[WEATHER, NOARGS], stream=True
    ))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "Need the weather."
    pieces = [tc.model_dump(exclude_none=True) for d in deltas for tc in d.tool_calls or ()]
    # chunks that arrive together are merged into one event (gateway.openai_format): the
    # split into pieces may vary, the first piece of each call alone carries id/type/name
    calls: dict[int, list[dict]] = {}
    for piece in pieces:
        calls.setdefault(piece["index"], []).append(piece)
    assert sorted(calls) == [0, 1]
    for index, (name, args) in enumerate([("get_weather", '{"city": "Paris"}'), ("now", "{}")]):
        first, *rest = calls[index]
        assert (first["id"], first["type"], first["function"]["name"]) == (
            ["call_a", "call_b"][index], "function", name,
        )  # fmt: skip
        assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}
                   for p in rest)  # fmt: skip
        assert "".join(p["function"]["arguments"] for p in calls[index]) == args
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert all(c.model == MODEL for c in chunks)  # `model` omitted: the router's name


def test_chunks_of_one_batch_merge_into_one_event():
    from gateway.openai_format import ChatBuilder
    from gateway.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(messages=MSGS, stream=True)
    builder = ChatBuilder("chatcmpl-1", MODEL, 1, 1, body)
    (event,) = builder.stream_batch([(0, c) for c in TOOL_CHUNKS])
    assert event == {
        "index": 0,
        "delta": {
            "reasoning_content": "Need the weather.",
            "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"index": 1, "id": "call_b", "type": "function",
                 "function": {"name": "now", "arguments": "{}"}},
            ],
        },
        "logprobs": None,
        "finish_reason": "tool_calls",
    }  # fmt: skip


def test_content_and_length_keep_their_finish_reason(fake, client):
    fake.chunks = [router_pb2.GenerateResponse(text="plain", finish_reason=LENGTH, usage=USAGE)]
    r = client.chat.completions.create(model=MODEL, messages=MSGS)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "plain"
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.reasoning_content is None


def _lp(token_id, logprob, token, top):
    return common_pb2.TokenLogprob(
        token_id=token_id, logprob=logprob, token=token,
        top=[common_pb2.TopLogprob(token_id=t, logprob=lp, token=s) for t, lp, s in top],
    )  # fmt: skip


PROMPT_LPS = [
    _lp(7, -0.5, " world", [(7, -0.5, " world"), (8, -1.5, " there")]),  # rank 1
    _lp(9, -3.0, "!", [(10, -0.25, "."), (11, -2.0, ",")]),  # outside the top: rank unknown
]
PROMPT_LPS_JSON = [
    None,
    {"7": {"logprob": -0.5, "rank": 1, "decoded_token": " world"},
     "8": {"logprob": -1.5, "rank": 2, "decoded_token": " there"}},
    {"9": {"logprob": -3.0, "rank": None, "decoded_token": "!"},
     "10": {"logprob": -0.25, "rank": 1, "decoded_token": "."},
     "11": {"logprob": -2.0, "rank": 2, "decoded_token": ","}},
]  # fmt: skip


def test_prompt_logprobs_response_shape(fake):
    fake.chunks = [
        router_pb2.GenerateResponse(text="a", prompt_logprobs=PROMPT_LPS),
        router_pb2.GenerateResponse(text="b", finish_reason=STOP, usage=USAGE),
    ]
    r = _post(fake, "/v1/chat/completions", {"messages": MSGS, "prompt_logprobs": 2, "n": 2})
    assert r.json()["prompt_logprobs"] == PROMPT_LPS_JSON
    assert r.json()["choices"][0]["message"]["content"] == "ab"
    r = _post(fake, "/v1/completions", {"prompt": ["x", "y"], "prompt_logprobs": 2})
    assert [c["prompt_logprobs"] for c in r.json()["choices"]] == [PROMPT_LPS_JSON] * 2
    r = _post(fake, "/v1/completions", {"prompt": "x"})
    assert r.json()["choices"][0]["prompt_logprobs"] is None


def test_model_omitted_is_the_routers_served_name(fake):
    for path, body in [("/v1/chat/completions", {"messages": MSGS}),
                       ("/v1/completions", {"prompt": "x"})]:  # fmt: skip
        assert _post(fake, path, body).json()["model"] == MODEL
        with httpx.stream("POST", fake.url + path, json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]  # fmt: skip
        assert events and all(e["model"] == MODEL for e in events)
        assert fake.requests[-1].model == ""  # the router picks its own model


# ---------------------------------------------------------------------------------------------
# The same errors from the real router (over fake workers): its checks name the constraint
# "structured_outputs", the client reads the field it used.

BAD_TYPE = {"type": 5}  # not a JSON Schema: "type" must be a string or a list


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": BAD_TYPE}}},
         "response_format"),
        ({"guided_json": BAD_TYPE}, "guided_json"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"json": BAD_TYPE}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ],
)  # fmt: skip
def test_real_router_constraint_errors_name_the_field(stack, fields, param):
    body = {"model": "tiny", "max_tokens": 2, **fields}
    r = httpx.post(stack["url"] + "/v1/chat/completions", json={**body, "messages": MSGS})
    _assert_400(r, param)
    _assert_400(httpx.post(stack["url"] + "/v1/completions", json={**body, "prompt": "hi"}), param)
