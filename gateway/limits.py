"""Request limits the gateway enforces before any work reaches the router.

Each check raises a 400 naming the offending field in `param`, as OpenAI does. The router
checks sampling ranges and tokens against max_model_len itself (router.validate), so this
module holds only what is cheap to see on the HTTP body: sizes and counts.
"""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.errors import APIError, bad_request
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

# Fields tandem does not implement and that would change the output: refusing them beats a
# silently wrong answer (vLLM would honour them). Each maps to the values that mean "off".
_UNSUPPORTED: dict[str, tuple] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "use_beam_search": (None, False),
    "best_of": (None, 1),
    "prompt_logprobs": (None, 0),
    "suffix": (None, ""),
}


def _limit(message: str, param: str) -> APIError:
    return bad_request(message, param, reason="limit")


def _check_fields(r: SamplingFields, cfg: GatewayConfig) -> None:
    extra = dict(r.model_extra or {})
    if isinstance(r, CompletionRequest):
        extra["suffix"] = r.suffix
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


def _check_max_tokens(name: str, value: int | None, cfg: GatewayConfig) -> None:
    if value is not None and value > cfg.max_tokens_limit:
        raise _limit(f"{name} must be at most {cfg.max_tokens_limit}", name)


def _check_logprobs(name: str, value: int | None, cfg: GatewayConfig) -> None:
    if value is not None and value > cfg.max_logprobs:
        raise _limit(f"{name} must be at most {cfg.max_logprobs}", name)


def check_chat(r: ChatCompletionRequest, cfg: GatewayConfig) -> None:
    _check_fields(r, cfg)
    _check_sampling(r, cfg)
    _check_max_tokens("max_tokens", r.max_tokens, cfg)
    _check_max_tokens("max_completion_tokens", r.max_completion_tokens, cfg)
    _check_logprobs("top_logprobs", r.top_logprobs, cfg)
    if r.top_logprobs and not r.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    if len(r.messages) > cfg.max_messages:
        raise _limit(f"at most {cfg.max_messages} messages", "messages")
    chars = sum(len(m.text()) + len(m.name or "") for m in r.messages)
    if chars > cfg.max_prompt_chars:
        raise _limit(
            f"the messages hold {chars} characters, more than {cfg.max_prompt_chars}", "messages"
        )


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
