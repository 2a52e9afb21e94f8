"""protobuf <-> the core's records, for the worker servicers (prefill and decode share these)
and for the router.

The router imports this module for the SamplingParams pair, so that tandem.v1.SamplingParams
has one conversion, whoever reads or writes it (the public GenerateRequest and the workers'
DecodeRequest / PrefillRequest carry the same message). This is the one home both may import:
the router sits floors above worker/, while tandem/ may not import protos, protos may not
import tandem, and kvtransfer/ pulls torch in (its package imports torch), which the router
must never load. Keep this module light: protos and the core's torch-free records and rules
(tandem.records, tandem.validation) only.
"""

from __future__ import annotations

import asyncio

from protos import common_pb2
from tandem.records import SamplingParams, StructuredOutput
from tandem.validation import InvalidField, RequestLimits, check_prompt, check_sampling

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

    check=True: out-of-range values raise ValueError (-> INVALID_ARGUMENT), and top_k 0 is
    "off" (-1). check=False (the router, and checked_request): the values as sent, top_k
    included, for tandem/validation.py to refuse with its messages, naming the caller's fields.
    """
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=-1 if check and p.top_k == 0 else p.top_k,
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
        structured=structured_from_proto(p.structured) if p.HasField("structured") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        check=check,
    )


# StructuredOutput's oneof field <-> StructuredOutput.kind
_KIND_FIELDS = {
    "json": "json_schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "structural_tag": "structural_tag",
}
_FIELD_KINDS = {v: k for k, v in _KIND_FIELDS.items()}


def structured_from_proto(p: common_pb2.StructuredOutput) -> StructuredOutput | None:
    """None when no kind is set (an empty message constrains nothing)."""
    which = p.WhichOneof("kind")
    if which is None:
        return None
    if which == "choice":
        return StructuredOutput("choice", choices=tuple(p.choice.choices))
    if which == "json_object":
        return StructuredOutput("json_object")
    return StructuredOutput(_FIELD_KINDS[which], spec=getattr(p, which))


def structured_to_proto(s: StructuredOutput) -> common_pb2.StructuredOutput:
    """Raises InvalidField for a kind the wire does not carry."""
    field = _KIND_FIELDS.get(s.kind)
    if field is None:
        raise InvalidField("structured_outputs", f"unknown structured output kind {s.kind!r}")
    p = common_pb2.StructuredOutput()
    if s.kind == "choice":
        p.choice.choices.extend(s.choices)
    elif s.kind == "json_object":
        p.json_object = True
    else:
        setattr(p, field, s.spec)
    return p


def request_limits(engine) -> RequestLimits:
    """A worker's limits, read once from its LLMEngine (the model's vocabulary and context)."""
    return RequestLimits(engine.model_cfg.vocab_size, engine.max_model_len, engine.cfg.max_logprobs)


# the core's param names -> the wire fields of a DecodeRequest / PrefillRequest
_PROMPT_FIELD = "prompt_token_ids"
_TOP_LEVEL_FIELDS = {
    "prompt": _PROMPT_FIELD,
    "num_output_tokens": "num_output_tokens",
    "structured_outputs": "sampling.structured",
}


def checked_request(request, limits: RequestLimits) -> tuple[list[int], SamplingParams]:
    """A DecodeRequest's or PrefillRequest's prompt and settings, checked at the worker's own
    boundary with the router's rules (tandem/validation.py) against this worker's model: a
    caller that skips the router (Decode.Session, Prefill.Prefill called directly) must not
    get a value past it that would fail inside the engine loop. Raises InvalidField (a
    ValueError -> INVALID_ARGUMENT) whose message starts with the wire field's name."""
    params = sampling_from_proto(request.sampling, check=False)
    if params.top_k == 0:
        params.top_k = -1  # the wire's "off", as the sampler reads it
    prompt = list(request.prompt_token_ids)
    try:
        check_sampling(params, request.sampling.top_logprobs, limits.max_top_logprobs)
        check_prompt(prompt, params, limits, "prompt", request.num_output_tokens)
    except InvalidField as e:
        field = _TOP_LEVEL_FIELDS.get(e.param, f"sampling.{e.param}")
        raise InvalidField(field, f"{field}: {e.message}", e.context_length) from None
    return prompt, params


async def compile_structured(engine, params: SamplingParams) -> None:
    """Compile a request's constraint in a thread (xgrammar may take a while on a big schema)
    before it goes to the engine loop, whose lookup is then a cache hit. engine: the core
    LLMEngine. Raises InvalidField naming the wire field for a spec xgrammar refuses."""
    if params.structured is None:
        return
    try:
        await asyncio.to_thread(engine.grammars.compile, params.structured)
    except InvalidField as e:
        field = _TOP_LEVEL_FIELDS["structured_outputs"]
        raise InvalidField(field, f"{field}: {e.message}") from None


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
    if s.structured is not None:
        p.structured.CopyFrom(structured_to_proto(s.structured))
    if s.prompt_logprobs is not None:
        p.prompt_logprobs = s.prompt_logprobs
    return p
