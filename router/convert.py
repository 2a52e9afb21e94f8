"""_from_proto / _to_proto helpers: protobuf stops here and in the servicers."""

from __future__ import annotations

import json

from protos import common_pb2, router_pb2
from router.tokenizer import RouterTokenizer
from router.types import ChoiceChunk, ErrorKind, GenerateInput, RequestError
from router.validate import MAX_SCHEMA_CHARS, MAX_TEMPLATE_KWARGS_CHARS, MAX_TOOLS
from tandem.records import Logprob
from worker.convert import sampling_from_proto


def logprob_from_proto(p: common_pb2.TokenLogprob) -> Logprob:
    # (the workers' twin lives with the KV handoff, in kvtransfer/, which loads torch)
    top = [(t.token_id, t.logprob) for t in p.top]
    return Logprob(p.token_id, p.logprob, top, p.rank if p.HasField("rank") else None)


def generate_input_from_proto(r: router_pb2.GenerateRequest) -> GenerateInput:
    sampling = sampling_from_proto(r.sampling, check=False)  # router/validate.py checks it
    sampling.stop = list(r.stop)
    sampling.include_stop_str_in_output = r.include_stop_str_in_output
    if r.HasField("skip_special_tokens"):
        sampling.skip_special_tokens = r.skip_special_tokens
    gi = GenerateInput(
        request_id=r.request_id,
        model=r.model,
        sampling=sampling,
        top_logprobs=r.sampling.top_logprobs,
        n=r.n or 1,
        echo=r.echo,
        add_generation_prompt=(
            r.add_generation_prompt if r.HasField("add_generation_prompt") else True
        ),
        add_special_tokens=r.add_special_tokens if r.HasField("add_special_tokens") else True,
    )
    kind = r.WhichOneof("prompt")
    if kind == "text":
        gi.text = r.text
    elif kind == "chat":
        gi.messages = messages_from_proto(r.chat.messages)
    elif kind == "token_ids":
        gi.prompt_token_ids = list(r.token_ids.ids)
    gi.tools = tools_from_proto(r.tools)
    if r.HasField("tool_choice"):
        which = r.tool_choice.WhichOneof("choice")
        gi.tool_choice = getattr(r.tool_choice, which) if which else None
    gi.chat_template_kwargs = template_kwargs_from_json(r.chat_template_kwargs_json)
    return gi


def _bad(param: str, message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, message, param=param)


def messages_from_proto(messages) -> list[dict]:
    return [_message_from_proto(m) for m in messages]


def _message_from_proto(m: router_pb2.ChatMessage) -> dict:
    """A chat message as HF chat templates see it (OpenAI's shape)."""
    d = {"role": m.role, "content": m.content}
    if m.HasField("name"):
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.HasField("tool_call_id"):
        d["tool_call_id"] = m.tool_call_id
    if m.HasField("reasoning_content"):
        d["reasoning_content"] = m.reasoning_content
    return d


def _arguments(text: str) -> dict | str:
    # HF templates render `tool_call.arguments | tojson` (or iterate its items): they want the
    # object, not its JSON text; text that is not a JSON object stays text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def tools_from_proto(tools) -> list[dict] | None:
    """OpenAI function dicts {"name", "description", "parameters", "strict"?}; None if none."""
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:  # before parsing their schemas
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    out = []
    for i, t in enumerate(tools):
        param = f"tools[{i}].function.parameters"
        if len(t.parameters_json) > MAX_SCHEMA_CHARS:
            raise _bad(param, f"the parameters schema is longer than {MAX_SCHEMA_CHARS} characters")
        try:
            params = json.loads(t.parameters_json) if t.parameters_json else {}
        except ValueError as e:
            raise _bad(param, f"the parameters schema is not valid JSON: {e}") from None
        f = {"name": t.name, "description": t.description, "parameters": params}
        if t.strict:
            f["strict"] = True
        out.append(f)
    return out


def template_kwargs_from_json(text: str) -> dict:
    if not text:
        return {}
    if len(text) > MAX_TEMPLATE_KWARGS_CHARS:
        raise _bad(
            "chat_template_kwargs",
            f"chat_template_kwargs is longer than {MAX_TEMPLATE_KWARGS_CHARS} characters",
        )
    try:
        value = json.loads(text)
    except ValueError as e:
        raise _bad("chat_template_kwargs", f"chat_template_kwargs is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _bad("chat_template_kwargs", "chat_template_kwargs must be a JSON object")
    return value


def logprob_to_proto(lp: Logprob, tok: RouterTokenizer) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        token=tok.token_text(lp.token_id),
        token_bytes=tok.token_bytes(lp.token_id),
        rank=lp.rank,
        top=[
            common_pb2.TopLogprob(
                token_id=t, logprob=v, token=tok.token_text(t), token_bytes=tok.token_bytes(t)
            )
            for t, v in lp.top
        ],
    )


def chunk_to_proto(
    c: ChoiceChunk, request_id: str, tok: RouterTokenizer
) -> router_pb2.GenerateResponse:
    # Once per message, several tokens when merged: only the fields that are set.
    out = router_pb2.GenerateResponse(
        request_id=request_id, index=c.index, token_ids=c.token_ids, text=c.text
    )
    if c.logprobs:
        out.logprobs.extend([logprob_to_proto(lp, tok) for lp in c.logprobs])
    if c.finish_reason:
        out.finish_reason = int(c.finish_reason)
        out.stop_reason = c.stop_reason
    if c.prompt_token_ids:
        out.prompt_token_ids.extend(c.prompt_token_ids)
    if c.reasoning_text:
        out.reasoning_text = c.reasoning_text
    if c.tool_calls:
        out.tool_calls.extend(
            router_pb2.ToolCallDelta(index=d.index, id=d.id, name=d.name, arguments=d.arguments)
            for d in c.tool_calls
        )
    if c.prompt_logprobs:
        out.prompt_logprobs.extend([logprob_to_proto(lp, tok) for lp in c.prompt_logprobs])
    if c.timing is not None:
        t = c.timing
        out.timing.CopyFrom(
            router_pb2.Timing(
                queue_ms=t.queue_ms,
                prefill_ms=t.prefill_ms,
                kv_transfer_ms=t.kv_transfer_ms,
                ttft_ms=t.ttft_ms,
                e2e_ms=t.e2e_ms,
                # prefill_worker / decode_worker stay empty: internal addresses are not the
                # public API's business (the router logs them, event=choice_routed)
            )
        )
    if c.usage is not None:
        u = c.usage
        out.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
                cached_tokens=u.cached_tokens,
            )
        )
    return out
