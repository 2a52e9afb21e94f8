"""_from_proto / _to_proto helpers: protobuf stops here and in the servicers."""

from __future__ import annotations

from protos import common_pb2, router_pb2
from router.tokenizer import RouterTokenizer
from router.types import ChoiceChunk, GenerateInput
from tandem.records import Logprob
from worker.convert import sampling_from_proto


def logprob_from_proto(p: common_pb2.TokenLogprob) -> Logprob:
    # (the workers' twin lives with the KV handoff, in kvtransfer/, which loads torch)
    return Logprob(p.token_id, p.logprob, [(t.token_id, t.logprob) for t in p.top])


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
