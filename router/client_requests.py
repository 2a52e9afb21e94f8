"""Requests of the typed client (router/client.py): Python values -> the Router API's messages.

Chat messages, tools and tool_choice in OpenAI's shapes, structured outputs as a
tandem.records.StructuredOutput or vLLM's structured_outputs dict.
"""

from __future__ import annotations

import json

from protos import common_pb2, router_pb2
from tandem.records import StructuredOutput

_SAMPLING = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}


def build_request(
    prompt: str | list[int] | None = None,
    *,
    messages: list[dict] | None = None,
    model: str = "",
    n: int = 1,
    stop: list[str] | str | None = None,
    request_id: str = "",
    echo: bool = False,
    include_stop_str_in_output: bool = False,
    skip_special_tokens: bool = True,
    tools: list[dict] | None = None,
    tool_choice: str | dict | None = None,
    structured: StructuredOutput | dict | None = None,
    chat_template_kwargs: dict | None = None,
    **sampling,
) -> router_pb2.GenerateRequest:
    unknown = set(sampling) - _SAMPLING
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
    req = router_pb2.GenerateRequest(
        model=model,
        n=n,
        request_id=request_id,
        echo=echo,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        include_stop_str_in_output=include_stop_str_in_output,
        skip_special_tokens=skip_special_tokens,
        sampling=common_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
        tools=[_tool_to_proto(t) for t in tools or ()],
        chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
    )
    if structured is not None:
        req.sampling.structured.CopyFrom(structured_to_proto(structured))
    if tool_choice is not None:
        req.tool_choice.CopyFrom(_tool_choice_to_proto(tool_choice))
    if messages is not None:
        req.chat.messages.extend(message_to_proto(m) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def message_to_proto(m: dict) -> router_pb2.ChatMessage:
    """A chat message in OpenAI's shape (content None, tool_calls with function.arguments as
    JSON text or a dict, tool_call_id, reasoning_content) or the proto's flat one."""
    out = router_pb2.ChatMessage(role=m["role"], content=m.get("content") or "")
    for key in ("name", "tool_call_id", "reasoning_content"):
        if m.get(key) is not None:
            setattr(out, key, m[key])
    for c in m.get("tool_calls") or ():
        f = c.get("function", c)
        args = f.get("arguments", "")
        out.tool_calls.append(
            router_pb2.ToolCall(
                id=c.get("id", ""),
                name=f["name"],
                arguments=args if isinstance(args, str) else json.dumps(args),
            )
        )
    return out


def _tool_to_proto(t: dict) -> router_pb2.Tool:
    f = t.get("function", t)  # OpenAI's {"type": "function", "function": {...}} or the function
    params = f.get("parameters")
    return router_pb2.Tool(
        name=f["name"],
        description=f.get("description") or "",
        parameters_json=params if isinstance(params, str) else json.dumps(params or {}),
        strict=bool(f.get("strict")),
    )


def _tool_choice_to_proto(choice: str | dict) -> router_pb2.ToolChoice:
    if isinstance(choice, dict):  # OpenAI's {"type": "function", "function": {"name": ...}}
        return router_pb2.ToolChoice(function=choice["function"]["name"])
    if choice in ("none", "auto", "required"):
        return router_pb2.ToolChoice(mode=choice)
    return router_pb2.ToolChoice(function=choice)


def structured_to_proto(c: StructuredOutput | dict) -> common_pb2.StructuredOutput:
    """A StructuredOutput, or vLLM's structured_outputs dict with one of json (a schema dict
    or its JSON text), json_object, regex, choice, grammar, structural_tag."""
    if isinstance(c, StructuredOutput):
        kind, value = c.kind, list(c.choices) if c.kind == "choice" else c.spec
    else:
        given = {k: v for k, v in c.items() if v not in (None, False)}
        if len(given) != 1:
            raise TypeError(f"structured takes exactly one constraint, got {sorted(given)}")
        ((kind, value),) = given.items()
    if kind == "json":
        text = value if isinstance(value, str) else json.dumps(value)
        return common_pb2.StructuredOutput(json_schema=text)
    if kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    if kind == "choice":
        return common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(choices=list(value)))
    if kind == "structural_tag" and not isinstance(value, str):
        value = json.dumps(value)
    if kind not in ("regex", "grammar", "structural_tag"):
        raise TypeError(f"unknown structured output kind {kind!r}")
    return common_pb2.StructuredOutput(**{kind: value})


def tokenize_request(
    text: str | None = None,
    messages: list[dict] | None = None,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
) -> router_pb2.TokenizeRequest:
    req = router_pb2.TokenizeRequest(
        tools=[_tool_to_proto(t) for t in tools or ()],
        chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
    )
    if messages is not None:
        req.chat.messages.extend(message_to_proto(m) for m in messages)
    else:
        req.text = text or ""
    return req
