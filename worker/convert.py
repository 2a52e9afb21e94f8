"""protobuf <-> the core's records, for the worker servicers (prefill and decode share these)
and for the router.

The router imports this module for the SamplingParams pair, so that tandem.v1.SamplingParams
has one conversion, whoever reads or writes it (the public GenerateRequest and the workers'
DecodeRequest / PrefillRequest carry the same message). This is the one home both may import:
the router sits floors above worker/, while tandem/ may not import protos, protos may not
import tandem, and kvtransfer/ pulls torch in (its package imports torch), which the router
must never load. Keep this module light: protos and tandem.records only.
"""

from __future__ import annotations

from protos import common_pb2
from tandem.records import SamplingParams

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def finish_to_proto(reason: str | None) -> int:
    return _FINISH_TO_PROTO[reason]


def sampling_from_proto(p: common_pb2.SamplingParams, check: bool = True) -> SamplingParams:
    """Unset optional fields take their defaults; max_tokens stays None when unset.

    check=True (the workers): out-of-range values raise ValueError (-> INVALID_ARGUMENT), and
    top_k <= 0 is "off" (-1). check=False (the router): the values as sent, top_k included,
    for router/validate.py to refuse with the public API's messages.
    """
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.top_k > 0 or not check else -1,
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
        # the wire's flag + count; a count without the flag asks for nothing
        logprobs=p.top_logprobs if p.logprobs else None,
        check=check,
    )


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    """What the router sends its workers. Stop strings and detokenization settings stay in
    the router (it matches stop strings itself); seed and max_tokens only when set."""
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
        logprobs=s.logprobs is not None,
        top_logprobs=s.logprobs or 0,
    )
    if s.seed is not None:
        p.seed = s.seed
    if s.max_tokens is not None:
        p.max_tokens = s.max_tokens
    return p
