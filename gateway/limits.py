"""Request limits the gateway enforces before any work reaches the router.

Each check raises a 400 naming the offending field in `param`, as OpenAI does. The router
checks sampling ranges and tokens against max_model_len itself (router.validate), so this
module holds only what is cheap to see on the HTTP body: sizes and counts.
"""

from __future__ import annotations

import json

from gateway.config import GatewayConfig
from gateway.errors import APIError, bad_request
from gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    TokenizeRequest,
)
from tandem.validation import MAX_STRUCTURED_SPEC

# Fields tandem does not implement and that would change the output: refusing them beats a
# silently wrong answer (vLLM would honour them). Each maps to the values that mean "off".
# (best_of is checked apart: best_of == n is what every request does anyway.)
_UNSUPPORTED: dict[str, tuple] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "use_beam_search": (None, False),
    "suffix": (None, ""),
}

# Structured outputs and tools: the workers compile each constraint (xgrammar) and the router
# renders every tool into the prompt, so their size is bounded here, before any of that work,
# with the router's bounds (router.validate; the gateway cannot import it).
MAX_TOOLS = 128  # tools per request
MAX_TOOLS_BYTES = 1 << 20  # all tool definitions together, as JSON
MAX_TEMPLATE_KWARGS_BYTES = 1 << 16  # chat_template_kwargs, as JSON


def _limit(message: str, param: str) -> APIError:
    return bad_request(message, param, reason="limit")


def _check_fields(r: SamplingFields, cfg: GatewayConfig) -> None:
    extra = dict(r.model_extra or {})
    if isinstance(r, CompletionRequest):
        extra["suffix"] = r.suffix
    best_of = extra.pop("best_of", None)
    if best_of is not None and (type(best_of) is not int or best_of != r.n):
        # vLLM serves best_of > n only without streaming; tandem does it offline (tandem.llm)
        raise bad_request("best_of must equal n on the HTTP API", "best_of")
    for name, value in extra.items():
        off = _UNSUPPORTED.get(name)
        if off is not None and value not in off:
            raise bad_request(f"`{name}` is not supported by this server", name)
        if off is None and cfg.reject_unknown_fields:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name)


def _check_sampling(r: SamplingFields, cfg: GatewayConfig) -> None:
    if r.n > cfg.max_n:
        raise _limit(f"n must be at most {cfg.max_n}", "n")
    stops = r.stop_list()
    if len(stops) > cfg.max_stop_sequences:
        raise _limit(f"at most {cfg.max_stop_sequences} stop sequences", "stop")
    if any(not s or len(s) > cfg.max_stop_len for s in stops):
        raise _limit(f"stop sequences must have 1..{cfg.max_stop_len} characters", "stop")
    if len(r.stop_token_ids or ()) > cfg.max_stop_token_ids:
        raise _limit(f"at most {cfg.max_stop_token_ids} stop_token_ids", "stop_token_ids")
    if len(r.logit_bias or ()) > cfg.max_logit_bias:
        raise _limit(f"logit_bias takes at most {cfg.max_logit_bias} entries", "logit_bias")
    _check_logprobs("prompt_logprobs", r.prompt_logprobs, cfg)
    if r.stream and r.prompt_logprobs:
        raise bad_request("`prompt_logprobs` are not available when `stream=True`.",
                          "prompt_logprobs")  # fmt: skip


def _check_max_tokens(name: str, value: int | None, cfg: GatewayConfig) -> None:
    if value is not None and value > cfg.max_tokens_limit:
        raise _limit(f"{name} must be at most {cfg.max_tokens_limit}", name)


def _check_logprobs(name: str, value: int | None, cfg: GatewayConfig) -> None:
    if value is not None and value > cfg.max_logprobs:
        raise _limit(f"{name} must be at most {cfg.max_logprobs}", name)


def check_structured(field: str, constraint) -> None:
    """One StructuredOutput built from `field`, measured as the core measures it."""
    kind = constraint.WhichOneof("kind")
    if kind == "choice":
        size = sum(len(c.encode()) for c in constraint.choice.choices)
    else:
        size = len(str(getattr(constraint, kind)).encode())
    if size > MAX_STRUCTURED_SPEC:
        raise _limit(f"`{field}` takes more than {MAX_STRUCTURED_SPEC} bytes", field)


def _message_chars(m: ChatMessage) -> int:
    calls = sum(len(c.id) + len(c.function.name) + len(c.function.arguments)
                for c in m.tool_calls or ())  # fmt: skip
    extra = (m.name, m.tool_call_id, m.reasoning_content)
    return len(m.text()) + calls + sum(len(x or "") for x in extra)


def _check_chat_input(r: ChatCompletionRequest | TokenizeRequest, cfg: GatewayConfig) -> None:
    messages = r.messages or []
    if len(messages) > cfg.max_messages:
        raise _limit(f"at most {cfg.max_messages} messages", "messages")
    chars = sum(_message_chars(m) for m in messages)
    if chars > cfg.max_prompt_chars:
        raise _limit(
            f"the messages hold {chars} characters, more than {cfg.max_prompt_chars}", "messages"
        )
    tools = r.tools or []
    if len(tools) > MAX_TOOLS:
        raise _limit(f"at most {MAX_TOOLS} tools", "tools")
    if any(len(json.dumps(t.function.parameters or {})) > MAX_STRUCTURED_SPEC for t in tools):
        raise _limit(f"a tool's parameters take more than {MAX_STRUCTURED_SPEC} bytes", "tools")
    if tools and len(json.dumps([t.model_dump() for t in tools])) > MAX_TOOLS_BYTES:
        raise _limit(f"the tools take more than {MAX_TOOLS_BYTES} bytes of JSON", "tools")
    kwargs = r.chat_template_kwargs
    if kwargs and len(json.dumps(kwargs)) > MAX_TEMPLATE_KWARGS_BYTES:
        raise _limit(
            f"chat_template_kwargs take more than {MAX_TEMPLATE_KWARGS_BYTES} bytes of JSON",
            "chat_template_kwargs",
        )


def check_chat(r: ChatCompletionRequest, cfg: GatewayConfig) -> None:
    _check_fields(r, cfg)
    _check_sampling(r, cfg)
    _check_max_tokens("max_tokens", r.max_tokens, cfg)
    _check_max_tokens("max_completion_tokens", r.max_completion_tokens, cfg)
    _check_logprobs("top_logprobs", r.top_logprobs, cfg)
    if r.top_logprobs and not r.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    _check_chat_input(r, cfg)


def check_tokenize(r: TokenizeRequest, cfg: GatewayConfig) -> None:
    if r.prompt is not None and len(r.prompt) > cfg.max_prompt_chars:
        raise _limit(f"the prompt has more than {cfg.max_prompt_chars} characters", "prompt")
    _check_chat_input(r, cfg)


def check_completion(r: CompletionRequest, cfg: GatewayConfig) -> None:
    _check_fields(r, cfg)
    _check_sampling(r, cfg)
    _check_max_tokens("max_tokens", r.max_tokens, cfg)
    _check_logprobs("logprobs", r.logprobs, cfg)
    prompts = r.prompts()
    if not prompts or len(prompts) > cfg.max_prompts:
        raise _limit(f"prompt must hold 1..{cfg.max_prompts} prompts", "prompt")
    if any(len(p) > cfg.max_prompt_chars for p in prompts if isinstance(p, str)):
        raise _limit(f"a prompt has more than {cfg.max_prompt_chars} characters", "prompt")
