"""protobuf <-> core types for the worker servicers (prefill and decode share these)."""

from __future__ import annotations

from protos import common_pb2
from tandem.request import Logprob
from tandem.sampling_params import SamplingParams

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def finish_to_proto(reason: str | None) -> int:
    return _FINISH_TO_PROTO[reason]


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError (-> INVALID_ARGUMENT) for out-of-range values."""
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.top_k > 0 else -1,
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
        logprobs=p.top_logprobs if p.logprobs else None,
    )


def logprob_to_proto(
    lp: Logprob | None, into: common_pb2.TokenLogprob | None = None
) -> common_pb2.TokenLogprob | None:
    """into: fill this message in place (an element of a repeated field) instead of a new one."""
    if lp is None:
        return None
    p = common_pb2.TokenLogprob() if into is None else into
    p.token_id = lp.token_id
    p.logprob = lp.logprob
    top = p.top
    for t, v in lp.top:
        e = top.add()
        e.token_id = t
        e.logprob = v
    return p


def logprob_from_proto(p: common_pb2.TokenLogprob, present: bool) -> Logprob | None:
    if not present:
        return None
    return Logprob(p.token_id, p.logprob, [(t.token_id, t.logprob) for t in p.top])
