"""OpenAI request models -> tandem.v1.GenerateRequest (the only place that builds them).

Structured outputs come in through six fields (OpenAI's response_format, vLLM's guided_* and
structured_outputs); each becomes the one SamplingParams.structured, and the field a client
used is remembered so that the router's errors about it (param "structured_outputs") can be
reported under that name.
"""

from __future__ import annotations

import json

from gateway.config import GatewayConfig
from gateway.errors import bad_request
from gateway.limits import check_chat, check_completion, check_structured, check_tokenize
from gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    TokenizeRequest,
    Tool,
)
from protos import common_pb2, router_pb2

StructuredOutput = common_pb2.StructuredOutput


def _json_text(value, field: str) -> str:
    """A schema given as an object or as JSON text -> JSON text (400 naming field if bad)."""
    if not isinstance(value, str):
        return json.dumps(value)
    try:
        json.loads(value)
    except ValueError:
        raise bad_request(f"`{field}` is not valid JSON", field) from None
    return value


def _structured_outputs(so) -> list[tuple[str, StructuredOutput]]:
    field = "structured_outputs"
    found = []
    if so.json_ is not None:
        found.append(StructuredOutput(json_schema=_json_text(so.json_, field)))
    if so.regex is not None:
        found.append(StructuredOutput(regex=so.regex))
    if so.choice is not None:
        found.append(StructuredOutput(choice=common_pb2.ChoiceList(choices=so.choice)))
    if so.grammar is not None:
        found.append(StructuredOutput(grammar=so.grammar))
    if so.json_object:
        found.append(StructuredOutput(json_object=True))
    if so.structural_tag is not None:
        found.append(StructuredOutput(structural_tag=_json_text(so.structural_tag, field)))
    return [(field, s) for s in found]


def structured(r: SamplingFields) -> tuple[str, StructuredOutput] | None:
    """The request's output constraint and the field it came from; None: unconstrained."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = r.response_format
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
        so = StructuredOutput(json_object=True)
        if schema is not None:
            so = StructuredOutput(json_schema=json.dumps(schema))
        found.append(("response_format", so))
    if r.guided_json is not None:
        text = _json_text(r.guided_json, "guided_json")
        found.append(("guided_json", StructuredOutput(json_schema=text)))
    if r.guided_regex is not None:
        found.append(("guided_regex", StructuredOutput(regex=r.guided_regex)))
    if r.guided_choice is not None:
        choices = common_pb2.ChoiceList(choices=r.guided_choice)
        found.append(("guided_choice", StructuredOutput(choice=choices)))
    if r.guided_grammar is not None:
        found.append(("guided_grammar", StructuredOutput(grammar=r.guided_grammar)))
    if r.structured_outputs is not None:
        found += _structured_outputs(r.structured_outputs)
    if len(found) > 1:
        (first, _), (second, _) = found[:2]
        what = f"a second constraint in `{first}`" if first == second else f"`{first}`"
        raise bad_request(
            f"`{second}` cannot be combined with {what}: one output constraint per request",
            second,
        )
    return found[0] if found else None


def constraint_field(r: SamplingFields) -> str | None:
    """The field that holds the request's output constraint, for error `param`s."""
    found = structured(r)
    return found[0] if found else None


def _sampling(r: SamplingFields, cfg: GatewayConfig, max_tokens, logprobs: bool, top: int):
    s = common_pb2.SamplingParams(
        top_k=r.top_k or 0,
        min_p=r.min_p or 0.0,
        presence_penalty=r.presence_penalty or 0.0,
        frequency_penalty=r.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (r.logit_bias or {}).items()},
        stop_token_ids=r.stop_token_ids or [],
        ignore_eos=r.ignore_eos,
        min_tokens=r.min_tokens,
        logprobs=logprobs,
        top_logprobs=top,
    )
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        if (v := getattr(r, name)) is not None:
            setattr(s, name, v)
    if max_tokens is not None:
        s.max_tokens = max_tokens
    # vLLM returns no prompt logprobs in a stream (k > 0 is refused by gateway.limits)
    if r.prompt_logprobs is not None and not r.stream:
        s.prompt_logprobs = r.prompt_logprobs
    if (found := structured(r)) is not None:
        check_structured(*found)
        s.structured.CopyFrom(found[1])
    return s


def _common(r: SamplingFields, sampling) -> dict:
    return dict(
        model=r.model or "",
        sampling=sampling,
        stop=r.stop_list(),
        include_stop_str_in_output=r.include_stop_str_in_output,
        skip_special_tokens=r.skip_special_tokens,
        n=r.n,
    )


def _message(m: ChatMessage) -> router_pb2.ChatMessage:
    pm = router_pb2.ChatMessage(role=m.role, content=m.text())
    for name in ("name", "tool_call_id", "reasoning_content"):
        if (v := getattr(m, name)) is not None:
            setattr(pm, name, v)
    for c in m.tool_calls or ():
        pm.tool_calls.add(id=c.id, name=c.function.name, arguments=c.function.arguments)
    return pm


def tools_to_proto(tools: list[Tool] | None) -> list[router_pb2.Tool]:
    return [
        router_pb2.Tool(
            name=t.function.name,
            description=t.function.description or "",
            parameters_json=json.dumps(t.function.parameters or {}),
            strict=bool(t.function.strict),
        )
        for t in tools or ()
    ]


def _tool_choice(r: ChatCompletionRequest) -> router_pb2.ToolChoice | None:
    """None: unset ("auto" with tools, "none" without, as vLLM)."""
    choice, names = r.tool_choice, {t.function.name for t in r.tools or ()}
    if choice is None or (choice == "auto" and not names):
        return None
    if choice == "none":
        return router_pb2.ToolChoice(mode="none")
    if not names:
        raise bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if isinstance(choice, str):
        return router_pb2.ToolChoice(mode=choice)
    if choice.function.name not in names:
        raise bad_request(
            f"tool_choice names `{choice.function.name}`, which is not among the tools",
            "tool_choice",
        )
    return router_pb2.ToolChoice(function=choice.function.name)


def chat_to_proto(r: ChatCompletionRequest, cfg: GatewayConfig) -> router_pb2.GenerateRequest:
    check_chat(r, cfg)
    max_tokens = r.max_completion_tokens or r.max_tokens
    sampling = _sampling(r, cfg, max_tokens, r.logprobs, r.top_logprobs or 0)
    req = router_pb2.GenerateRequest(
        chat=router_pb2.ChatMessages(messages=[_message(m) for m in r.messages]),
        add_generation_prompt=r.add_generation_prompt,
        tools=tools_to_proto(r.tools),
        **_common(r, sampling),
    )
    if (choice := _tool_choice(r)) is not None:
        req.tool_choice.CopyFrom(choice)
    if r.chat_template_kwargs:
        req.chat_template_kwargs_json = json.dumps(r.chat_template_kwargs)
    return req


def completion_to_protos(
    r: CompletionRequest, cfg: GatewayConfig
) -> list[router_pb2.GenerateRequest]:
    """One GenerateRequest per prompt (a batch of prompts fans out in the gateway)."""
    check_completion(r, cfg)
    prompts = r.prompts()
    # OpenAI's legacy default is 16 tokens for completions.
    max_tokens = r.max_tokens if r.max_tokens is not None else 16
    lp = r.logprobs is not None
    sampling = _sampling(r, cfg, max_tokens, lp, r.logprobs or 0)
    out = []
    for p in prompts:
        req = router_pb2.GenerateRequest(echo=r.echo, **_common(r, sampling))
        if isinstance(p, str):
            req.text = p
        else:
            req.token_ids.ids.extend(p)
        out.append(req)
    return out


def tokenize_to_proto(r: TokenizeRequest, cfg: GatewayConfig) -> router_pb2.TokenizeRequest:
    check_tokenize(r, cfg)
    req = router_pb2.TokenizeRequest(
        model=r.model or "", return_token_strs=r.return_token_strs, tools=tools_to_proto(r.tools)
    )
    if r.prompt is not None:
        req.text = r.prompt
    else:
        req.chat.messages.extend(_message(m) for m in r.messages or ())
        req.add_generation_prompt = r.add_generation_prompt
    # vLLM's defaults: true for a prompt, false for messages (the template adds BOS)
    req.add_special_tokens = (
        r.add_special_tokens if r.add_special_tokens is not None else r.prompt is not None
    )
    if r.chat_template_kwargs:
        req.chat_template_kwargs_json = json.dumps(r.chat_template_kwargs)
    return req
