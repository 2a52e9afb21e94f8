"""The router's public API for tools, tool_choice, structured outputs, reasoning, chat template
kwargs and prompt logprobs: over fake workers, through the typed client (real gRPC).

The fakes emit a scripted token sequence, so the model's "output" is text we choose: the tests
check what the router makes of it (tool calls, reasoning, content) and what it sends the
workers (the structured-output constraint that forces a call, prompt_logprobs). Chat template
rendering with tools is checked against transformers' apply_chat_template on the same template.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from router_fakes import EOS, LoopThread, start_stack, write_model_dir

from protos import router_pb2
from router.client import AsyncTandemClient, TandemClient, TandemError
from router.client_requests import message_to_proto
from router.coalesce import Coalescer
from router.convert import chunk_to_proto
from router.reasoning import make_reasoning_parser
from router.tokenizer import RouterTokenizer
from router.tool_parsers import ToolCallDelta
from router.types import ChoiceChunk, FinishReason, GenerateInput
from router.validate import AUTO_TOOL_CHOICE_MESSAGE, MAX_TOOLS, validate_input
from tandem.records import Logprob, SamplingParams, StructuredOutput

pytestmark = pytest.mark.timeout(120)

# Qwen2.5's tool-calling template (Hermes format), plus Qwen3's enable_thinking switch.
TOOL_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nReturn a json object within <tool_call></tool_call> XML tags<|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
""".strip()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Now", "parameters": {"type": "object"}},
}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class Stack:
    """A router over one fake decode server (local prefill), the script settable per test,
    and every DecodeRequest the fake received."""

    def __init__(self, lt: LoopThread, model_dir, **config):
        self.lt = lt
        self.stack = lt.run(start_stack(model_dir, [EOS], num_prefill=0, **config))
        self.address = self.stack.address
        self.decode = self.stack.decodes[0]
        self.requests = []
        events = self.decode.servicer._events

        def recording(request, attempt):
            self.requests.append(request)
            return events(request, attempt)

        self.decode.servicer._events = recording

    def script(self, tok: RouterTokenizer, text: str) -> None:
        self.decode.state.script = tok.encode(text, add_special_tokens=False) + [EOS]

    def stop(self):
        self.lt.run(self.stack.stop())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model_dir = write_model_dir(tmp_path_factory.mktemp("tool_model"), 4096)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": TOOL_TEMPLATE}))
    lt = LoopThread()
    plain = Stack(lt, model_dir)
    parsed = Stack(
        lt,
        model_dir,
        tool_call_parser="hermes",
        enable_auto_tool_choice=True,
        reasoning_parser="qwen3",
    )
    yield model_dir, RouterTokenizer(model_dir), plain, parsed
    plain.stop()
    parsed.stop()
    lt.close()


def test_a_forced_named_tool_streams_one_call_and_constrains_the_worker(env):
    _, tok, plain, _ = env
    plain.script(tok, ' {"city": "Paris"}')
    with TandemClient(plain.address, timeout=30) as c:
        chunks = list(c.generate(messages=USER, tools=[WEATHER, TIME], tool_choice="get_weather"))
        done = c.complete(
            messages=USER,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    pieces = [d for ch in chunks for d in ch.tool_calls]
    assert pieces[0].index == 0 and pieces[0].id.startswith("call_")
    assert pieces[0].name == "get_weather" and all(not d.name for d in pieces[1:])
    assert "".join(d.arguments for d in pieces) == '{"city": "Paris"}'
    assert "".join(ch.text for ch in chunks) == "" and chunks[-1].finish_reason == "stop"
    ((call,),) = done.tool_calls
    assert (call.name, call.arguments, done.texts) == ("get_weather", '{"city": "Paris"}', [""])
    # what the worker was asked: the output is the function's arguments, per their schema
    sent = plain.requests[-1].sampling.structured
    assert json.loads(sent.json_schema) == WEATHER["function"]["parameters"]


def test_tool_choice_required_yields_each_call_of_the_array(env):
    _, tok, plain, _ = env
    plain.script(
        tok,
        '[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
        '{"name": "get_time", "parameters": {}}]',
    )
    with TandemClient(plain.address, timeout=30) as c:
        done = c.complete(messages=USER, tools=[WEATHER, TIME], tool_choice="required", n=2)
    for calls in done.tool_calls:
        assert [(x.name, json.loads(x.arguments)) for x in calls] == [
            ("get_weather", {"city": "Paris"}),
            ("get_time", {}),
        ]
    assert len({x.id for calls in done.tool_calls for x in calls}) == 4  # ids are unique
    schema = json.loads(plain.requests[-1].sampling.structured.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1


def test_auto_tool_choice_parses_calls_out_of_the_content(env):
    _, tok, _, parsed = env
    parsed.script(
        tok,
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call>",
    )
    with TandemClient(parsed.address, timeout=30) as c:
        done = c.complete(messages=USER, tools=[WEATHER])  # unset tool_choice: auto
        text_only = c.complete(messages=USER, tools=[WEATHER], tool_choice="none")
    ((call,),) = done.tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert done.texts == ["Let me check."]
    assert not parsed.requests[-2].sampling.HasField("structured")  # auto: unconstrained
    assert text_only.tool_calls == [[]] and "<tool_call>" in text_only.texts[0]


def test_reasoning_is_split_from_the_content(env):
    _, tok, _, parsed = env
    output = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny."
    parsed.script(tok, output)
    with TandemClient(parsed.address, timeout=30) as c:
        chunks = list(c.generate(messages=USER))
        done = c.complete(messages=USER, n=2)
        completion = c.complete("Weather?")  # a text prompt: no reasoning parser
        prompt = c.tokenize(messages=USER)
    parser = make_reasoning_parser("qwen3", tok.decode(prompt, False))
    whole = [a + b for a, b in zip(parser.feed(output), parser.flush(), strict=True)]
    assert whole[0].strip() == "The user wants weather." and whole[1].strip() == "It is sunny."
    assert "".join(ch.reasoning_text for ch in chunks) == whole[0]
    assert "".join(ch.text for ch in chunks) == whole[1]
    assert done.reasoning_texts == [whole[0]] * 2 and done.texts == [whole[1]] * 2
    assert completion.texts == [output] and completion.reasoning_texts == [""]


def test_tools_and_template_kwargs_reach_the_chat_template_as_in_transformers(env):
    from transformers import PreTrainedTokenizerFast

    model_dir, tok, plain, _ = env
    hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "call_1"},
    ]
    # HF templates take arguments as an object (transformers' own examples pass dicts)
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[2]["content"] = ""
    hf_messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    kwargs = {"enable_thinking": False}
    want = hf.apply_chat_template(
        hf_messages, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert '"arguments": {"city": "Paris"}' in want and '"name": "get_time"' in want
    assert want.endswith("<think>\n\n</think>\n\n")

    async def tokenize():
        async with AsyncTandemClient(plain.address, timeout=30) as c:
            req = router_pb2.TokenizeRequest(return_token_strs=True)
            req.chat.messages.extend(message_to_proto(m) for m in messages)
            req.tools.extend(
                router_pb2.Tool(
                    name=t["function"]["name"],
                    description=t["function"]["description"],
                    parameters_json=json.dumps(t["function"]["parameters"]),
                )
                for t in (WEATHER, TIME)
            )
            req.chat_template_kwargs_json = json.dumps(kwargs)
            return await c.stub.Tokenize(req)

    got = asyncio.run(tokenize())
    assert got.prompt == want
    assert list(got.token_ids) == hf(want, add_special_tokens=False).input_ids
    assert list(got.token_strs) == hf.convert_ids_to_tokens(list(got.token_ids))
    # Generate renders the same prompt for the workers
    plain.script(tok, "ok")
    with TandemClient(plain.address, timeout=30) as c:
        c.complete(messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                   chat_template_kwargs=kwargs)  # fmt: skip
    assert list(plain.requests[-1].prompt_token_ids) == list(got.token_ids)


BAD = [
    # (generate kwargs, param)
    (dict(structured={"json": "{not json"}), "structured_outputs"),
    (dict(structured={"json": {"type": "objekt"}}), "structured_outputs"),
    (dict(structured={"json": {"properties": []}}), "structured_outputs"),
    (dict(structured={"regex": "(unclosed"}), "structured_outputs"),
    (dict(structured={"choice": []}), "structured_outputs"),
    (dict(structured={"regex": "a+"}, tools=[WEATHER], tool_choice="required"), "tool_choice"),
    (dict(structured={"json_object": True}, tools=[WEATHER], tool_choice="get_weather"),
     "tool_choice"),
    (dict(tools=[WEATHER]), "tool_choice"),  # unset means auto: this router has no parser
    (dict(tools=[WEATHER], tool_choice="auto"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="get_time"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"name": "bad name!", "parameters": {}}], tool_choice="none"),
     "tools[0].function.name"),
    (dict(tools=[WEATHER, {"name": "f", "parameters": {"type": 5}}], tool_choice="none"),
     "tools[1].function.parameters"),
    (dict(tools=[{"name": "f", "parameters": "{oops"}], tool_choice="none"),
     "tools[0].function.parameters"),
    (dict(tools=[{"name": f"f{i}"} for i in range(MAX_TOOLS + 1)], tool_choice="none"), "tools"),
    (dict(tools=[{"name": "f", "parameters": {"description": "x" * 70000}}],
          tool_choice="none"), "tools[0].function.parameters"),
    (dict(chat_template_kwargs={"messages": []}), "chat_template_kwargs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "param"), BAD)
def test_refusals_name_the_parameter(env, kwargs, param):
    _, _, plain, _ = env
    with TandemClient(plain.address, timeout=30, max_retries=0) as c:
        with pytest.raises(TandemError) as e:
            c.complete(messages=USER, **kwargs)
    assert (e.value.code, e.value.param) == ("INVALID_ARGUMENT", param), e.value.details
    if kwargs == dict(tools=[WEATHER], tool_choice="auto"):
        assert e.value.details == AUTO_TOOL_CHOICE_MESSAGE


def test_tools_need_a_chat_prompt(env):
    _, _, plain, _ = env
    with TandemClient(plain.address, timeout=30) as c:
        with pytest.raises(TandemError) as e:
            c.complete("text prompt", tools=[WEATHER], tool_choice="none")
        assert e.value.param == "tools"
        with pytest.raises(TandemError) as e:
            c.complete("text prompt", chat_template_kwargs={"enable_thinking": False})
        assert e.value.param == "chat_template_kwargs"


def test_the_typed_client_carries_structured_outputs_and_prompt_logprobs(env):
    _, tok, plain, _ = env
    plain.script(tok, "yes")

    async def scenario():
        async with AsyncTandemClient(plain.address, timeout=30) as c:
            a = await c.complete("Q?", structured={"choice": ["yes", "no"]}, prompt_logprobs=2)
            b = [ch async for ch in c.generate("Q?", structured=StructuredOutput("regex", "y.s"))]
            return a, b

    a, b = asyncio.run(scenario())
    assert a.texts == ["yes"] and "".join(ch.text for ch in b) == "yes"
    first, second = plain.requests[-2:]
    assert list(first.sampling.structured.choice.choices) == ["yes", "no"]
    assert first.sampling.prompt_logprobs == 2
    assert second.sampling.structured.regex == "y.s"
    assert not second.sampling.HasField("prompt_logprobs")
    with TandemClient(plain.address, timeout=30) as c:
        c.complete("Q?", structured={"json": {"type": "object"}})
        c.complete("Q?", structured={"json_object": True})
    assert json.loads(plain.requests[-2].sampling.structured.json_schema) == {"type": "object"}
    assert plain.requests[-1].sampling.structured.json_object


def test_new_fields_on_the_wire_and_back(model_dir):
    """ChoiceChunk -> GenerateResponse (token text added, as for logprobs) -> client Chunk."""
    from router.client import _chunk

    tok = RouterTokenizer(model_dir)
    ids = tok.encode("Hello world", add_special_tokens=False)
    chunk = ChoiceChunk(
        0,
        [ids[0]],
        "",
        reasoning_text="hmm",
        tool_calls=[ToolCallDelta(0, "call_x", "f", '{"a"'), ToolCallDelta(0, arguments=": 1}")],
        prompt_logprobs=[Logprob(t, -0.5, [(t, -0.5), (3, -2.0)], rank=1) for t in ids[1:]],
    )
    msg = chunk_to_proto(chunk, "r1", tok)
    assert msg.reasoning_text == "hmm"
    assert [(d.index, d.id, d.name, d.arguments) for d in msg.tool_calls] == [
        (0, "call_x", "f", '{"a"'),
        (0, "", "", ": 1}"),
    ]
    assert "".join(p.token for p in msg.prompt_logprobs) == tok.decode(ids[1:])
    assert [p.top[1].token for p in msg.prompt_logprobs] == [tok.token_text(3)] * (len(ids) - 1)
    back = _chunk(router_pb2.GenerateResponse.FromString(msg.SerializeToString()))
    assert back.reasoning_text == "hmm" and back.tool_calls == chunk.tool_calls
    assert [p.token_id for p in back.prompt_logprobs] == ids[1:]


def test_validate_settles_tool_choice_and_the_forced_constraint():
    def gi(**kw):
        return GenerateInput("r", "", messages=USER, sampling=SamplingParams(max_tokens=None), **kw)

    functions = [WEATHER["function"], TIME["function"]]
    auto = gi(tools=functions)
    validate_input(auto, 4, auto_tool_choice=True)
    assert auto.tool_choice == "auto" and auto.sampling.structured is None
    named = gi(tools=functions, tool_choice="get_time")
    validate_input(named, 4)
    assert named.sampling.structured == StructuredOutput("json", json.dumps({"type": "object"}))
    plain = gi()
    validate_input(plain, 4)
    assert plain.tool_choice == "none"


def test_a_lagging_stream_keeps_reasoning_tool_calls_and_prompt_logprobs():
    """The router merges a choice's queued chunks when the client lags (router/coalesce.py):
    nothing of the new fields may be lost in the merge."""
    parts = [
        ChoiceChunk(0, [1], "", reasoning_text="a", prompt_logprobs=[Logprob(5, -1.0, [])]),
        ChoiceChunk(0, [2], "x", reasoning_text="b", tool_calls=[ToolCallDelta(0, "c", "f")]),
        ChoiceChunk(0, [3], "", tool_calls=[ToolCallDelta(0, arguments="{}")]),
        ChoiceChunk(0, [4], "y", finish_reason=FinishReason.STOP),
    ]
    merged = Coalescer(1)
    for p in parts:
        merged.add(p)
    (out,) = merged.take()
    assert (out.token_ids, out.text, out.reasoning_text) == ([1, 2, 3, 4], "xy", "ab")
    # a later piece of the same call joins the first one
    assert out.tool_calls == [ToolCallDelta(0, "c", "f", arguments="{}")]
    assert out.prompt_logprobs == [Logprob(5, -1.0, [])]
    assert out.finish_reason == FinishReason.STOP


def test_wire_messages_keep_tool_fields():
    m = message_to_proto(
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "why",
            "tool_calls": [{"id": "c1", "type": "function",
                            "function": {"name": "f", "arguments": {"a": 1}}}],
        }
    )  # fmt: skip
    assert (m.content, m.reasoning_content, m.tool_calls[0].arguments) == ("", "why", '{"a": 1}')
    t = message_to_proto({"role": "tool", "content": "42", "tool_call_id": "c1"})
    assert (t.role, t.content, t.tool_call_id) == ("tool", "42", "c1")
