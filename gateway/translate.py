"""OpenAI request models -> tandem.v1.GenerateRequest (the only place that builds them)."""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.errors import bad_request
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from protos import common_pb2, router_pb2


def _check_bounds(r: SamplingFields, max_tokens: int | None, cfg: GatewayConfig) -> None:
    if r.n > cfg.max_n:
        raise bad_request(f"n must be at most {cfg.max_n}", "n")
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        raise bad_request(f"max_tokens must be at most {cfg.max_tokens_limit}", "max_tokens")
    stops = r.stop_list()
    if len(stops) > cfg.max_stop_sequences:
        raise bad_request(f"at most {cfg.max_stop_sequences} stop sequences", "stop")
    if any(not s or len(s) > cfg.max_stop_len for s in stops):
        raise bad_request(f"stop sequences must have 1..{cfg.max_stop_len} characters", "stop")


def _sampling(r: SamplingFields, max_tokens, logprobs: bool, top_logprobs: int):
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
        top_logprobs=top_logprobs,
    )
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        if (v := getattr(r, name)) is not None:
            setattr(s, name, v)
    if max_tokens is not None:
        s.max_tokens = max_tokens
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


def chat_to_proto(r: ChatCompletionRequest, cfg: GatewayConfig) -> router_pb2.GenerateRequest:
    max_tokens = r.max_completion_tokens or r.max_tokens
    _check_bounds(r, max_tokens, cfg)
    if r.top_logprobs and not r.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    messages = []
    for m in r.messages:
        pm = router_pb2.ChatMessage(role=m.role, content=m.text())
        if m.name is not None:
            pm.name = m.name
        messages.append(pm)
    sampling = _sampling(r, max_tokens, r.logprobs, r.top_logprobs or 0)
    return router_pb2.GenerateRequest(
        chat=router_pb2.ChatMessages(messages=messages),
        add_generation_prompt=r.add_generation_prompt,
        **_common(r, sampling),
    )


def completion_to_protos(
    r: CompletionRequest, cfg: GatewayConfig
) -> list[router_pb2.GenerateRequest]:
    """One GenerateRequest per prompt (a batch of prompts fans out in the gateway)."""
    _check_bounds(r, r.max_tokens, cfg)
    if r.suffix:
        raise bad_request("suffix is not supported", "suffix")
    prompts = r.prompts()
    if not prompts or len(prompts) > cfg.max_prompts:
        raise bad_request(f"prompt must hold 1..{cfg.max_prompts} prompts", "prompt")
    # OpenAI's legacy default is 16 tokens for completions.
    max_tokens = r.max_tokens if r.max_tokens is not None else 16
    lp = r.logprobs is not None
    sampling = _sampling(r, max_tokens, lp, r.logprobs or 0)
    out = []
    for p in prompts:
        req = router_pb2.GenerateRequest(echo=r.echo, **_common(r, sampling))
        if isinstance(p, str):
            req.text = p
        else:
            req.token_ids.ids.extend(p)
        out.append(req)
    return out
