"""OpenAI request models -> tandem.v1.GenerateRequest (the only place that builds them)."""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.limits import check_chat, check_completion
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from protos import common_pb2, router_pb2


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
    check_chat(r, cfg)
    max_tokens = r.max_completion_tokens or r.max_tokens
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
    check_completion(r, cfg)
    prompts = r.prompts()
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
