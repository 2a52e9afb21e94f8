"""_from_proto / _to_proto helpers: protobuf stops here and in the servicers."""

from __future__ import annotations

from protos import common_pb2, router_pb2
from router.tokenizer import RouterTokenizer
from router.types import ChoiceChunk, GenerateInput, Logprob, Sampling


def sampling_from_proto(p: common_pb2.SamplingParams) -> Sampling:
    return Sampling(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        logit_bias=dict(p.logit_bias),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
    )


def sampling_to_proto(s: Sampling) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=s.logit_bias,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        min_tokens=s.min_tokens,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    if s.seed is not None:
        p.seed = s.seed
    if s.max_tokens is not None:
        p.max_tokens = s.max_tokens
    return p


def logprob_from_proto(p: common_pb2.TokenLogprob) -> Logprob:
    return Logprob(p.token_id, p.logprob, [(t.token_id, t.logprob) for t in p.top])


def generate_input_from_proto(r: router_pb2.GenerateRequest) -> GenerateInput:
    gi = GenerateInput(
        request_id=r.request_id,
        model=r.model,
        sampling=sampling_from_proto(r.sampling),
        stop=list(r.stop),
        include_stop_str_in_output=r.include_stop_str_in_output,
        skip_special_tokens=r.skip_special_tokens if r.HasField("skip_special_tokens") else True,
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
        gi.messages = [_message_from_proto(m) for m in r.chat.messages]
    elif kind == "token_ids":
        gi.prompt_token_ids = list(r.token_ids.ids)
    return gi


def _message_from_proto(m: router_pb2.ChatMessage) -> dict:
    d = {"role": m.role, "content": m.content}
    if m.HasField("name"):
        d["name"] = m.name
    return d


def logprob_to_proto(lp: Logprob, tok: RouterTokenizer) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        token=tok.token_text(lp.token_id),
        token_bytes=tok.token_bytes(lp.token_id),
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
    if c.timing is not None:
        t = c.timing
        out.timing.CopyFrom(
            router_pb2.Timing(
                queue_ms=t.queue_ms,
                prefill_ms=t.prefill_ms,
                kv_transfer_ms=t.kv_transfer_ms,
                ttft_ms=t.ttft_ms,
                e2e_ms=t.e2e_ms,
                prefill_worker=t.prefill_worker,
                decode_worker=t.decode_worker,
            )
        )
    if c.usage is not None:
        u = c.usage
        out.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.prompt_tokens + u.completion_tokens,
                cached_tokens=u.cached_tokens,
            )
        )
    return out
