"""The one set of rules for a request's sampling settings and tokens, wherever it arrives.

Torch-free and grpc-free: the router (public API), the workers' servicers (their own boundary:
a Decode.Session or Prefill.Prefill call need not come through the router) and the engine
(the offline API) all check with these functions, so a value the router refuses is refused
by a worker too, and nothing out of range reaches the engine loop, where an index error in
the sampler would fail a whole step.

A refusal is an InvalidField (a ValueError): `param` names the offending field in the public
API's words (top_logprobs, prompt, max_tokens); callers with other words (the workers' wire
fields) rename it. `context_length` marks the refusals OpenAI reports as
context_length_exceeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # records.py imports this module: the name only, for annotations
    from tandem.records import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_ABS_LOGIT_BIAS = 100.0
MAX_STRUCTURED_SPEC = 64 * 1024  # bytes of a schema, regex, grammar or structural tag
MAX_CHOICES = 1024
# tandem.records.STRUCTURED_KINDS, repeated: records imports this module (a test keeps the two
# equal)
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
_INT64 = (-(1 << 63), 1 << 63)


class InvalidField(ValueError):
    """A request field out of its range; str() is the message, `param` the field."""

    def __init__(self, param: str, message: str, context_length: bool = False) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.context_length = context_length


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the model's, and the API's bound on top_logprobs."""

    vocab_size: int
    max_model_len: int
    max_top_logprobs: int = MAX_TOP_LOGPROBS


def check_sampling(
    s: SamplingParams, top_logprobs: int | None = None, max_top_logprobs: int = MAX_TOP_LOGPROBS
) -> None:
    """Everything about the settings that needs neither the prompt nor the model.

    top_logprobs: the count as sent (the wire carries it even when logprobs is off, and the
    public API has always checked it then); None: the settings' own (s.logprobs).
    """
    if len(s.stop) > MAX_STOP_STRINGS or any(not 0 < len(x) <= MAX_STOP_LEN for x in s.stop):
        raise InvalidField(
            "stop", f"stop takes at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_LEN} characters"
        )
    if top_logprobs is None:
        top_logprobs = s.logprobs or 0
    # (param, value, ok, rule): the public API's names (top_logprobs, not the core's logprobs)
    checks = [
        ("temperature", s.temperature, math.isfinite(s.temperature) and s.temperature >= 0, ">= 0"),
        ("top_p", s.top_p, 0 < s.top_p <= 1, "in (0, 1]"),
        ("top_k", s.top_k, s.top_k >= -1, "-1 (disabled) or >= 0"),
        ("min_p", s.min_p, 0 <= s.min_p <= 1, "in [0, 1]"),
        ("presence_penalty", s.presence_penalty, -2 <= s.presence_penalty <= 2, "in [-2, 2]"),
        ("frequency_penalty", s.frequency_penalty, -2 <= s.frequency_penalty <= 2, "in [-2, 2]"),
        ("repetition_penalty", s.repetition_penalty, 0 < s.repetition_penalty <= 2, "in (0, 2]"),
        ("min_tokens", s.min_tokens, s.min_tokens >= 0, ">= 0"),
        ("max_tokens", s.max_tokens, s.max_tokens is None or s.max_tokens >= 1, ">= 1"),
        ("top_logprobs", top_logprobs, 0 <= top_logprobs <= max_top_logprobs,
         f"in [0, {max_top_logprobs}]"),
        ("seed", s.seed, s.seed is None or _INT64[0] <= s.seed < _INT64[1], "a 64-bit integer"),
    ]  # fmt: skip
    for name, value, ok, rule in checks:
        if not ok:
            raise InvalidField(name, f"{name} must be {rule}, got {value}")
    if s.max_tokens is not None and s.min_tokens > s.max_tokens:
        raise InvalidField("min_tokens", "min_tokens must not exceed max_tokens")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidField("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
    if len(s.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidField("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
    for v in s.logit_bias.values():
        if not -MAX_ABS_LOGIT_BIAS <= v <= MAX_ABS_LOGIT_BIAS:  # NaN fails too
            raise InvalidField("logit_bias", "logit_bias values must be in [-100, 100]")
    plp = s.prompt_logprobs
    if plp is not None and not 0 <= plp <= max_top_logprobs:
        raise InvalidField(
            "prompt_logprobs", f"prompt_logprobs must be in [0, {max_top_logprobs}], got {plp}"
        )
    if s.n < 1:
        raise InvalidField("n", f"n must be >= 1, got {s.n}")
    if s.best_of is not None and s.best_of < s.n:
        raise InvalidField("best_of", f"best_of must be >= n ({s.n}), got {s.best_of}")
    if s.structured is not None:
        check_structured(s.structured)


def check_structured(so) -> None:
    """The shape of a StructuredOutput (whether xgrammar accepts the spec is the worker's
    compile step: tandem/structured.py)."""
    param = "structured_outputs"
    if so.kind not in STRUCTURED_KINDS:
        raise InvalidField(param, f"structured output kind must be one of {STRUCTURED_KINDS}")
    if len(so.spec.encode()) > MAX_STRUCTURED_SPEC:
        raise InvalidField(param, f"the {so.kind} spec is over {MAX_STRUCTURED_SPEC} bytes")
    if so.kind in ("json", "regex", "grammar", "structural_tag") and not so.spec:
        raise InvalidField(param, f"the {so.kind} constraint needs a non-empty spec")
    if so.kind == "choice":
        if not 0 < len(so.choices) <= MAX_CHOICES:
            raise InvalidField(param, f"choice takes 1..{MAX_CHOICES} strings")
        if any(not c for c in so.choices):
            raise InvalidField(param, "choice strings must not be empty")
        if sum(len(c.encode()) for c in so.choices) > MAX_STRUCTURED_SPEC:
            raise InvalidField(param, f"the choices are over {MAX_STRUCTURED_SPEC} bytes")


def check_prompt(
    prompt_ids: Sequence[int],
    s: SamplingParams,
    limits: RequestLimits,
    prompt_param: str = "prompt",
    num_output_tokens: int = 0,
    cap_max_tokens: bool = False,
) -> None:
    """Token-level checks against the model. num_output_tokens: the prompt's last tokens are
    earlier outputs of this sequence (a migrated request); max_tokens counts them.
    cap_max_tokens: a max_tokens beyond the context is not refused (the offline API's engine
    ends such a request with "length" at the context's end instead)."""
    vocab = limits.vocab_size
    if not prompt_ids:
        raise InvalidField(prompt_param, "the prompt is empty")
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise InvalidField(prompt_param, f"token ids must be in [0, {vocab})")
    for name, ids in (("logit_bias", s.logit_bias), ("stop_token_ids", s.stop_token_ids)):
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidField(name, f"{name} token ids must be in [0, {vocab})")
    if not 0 <= num_output_tokens < len(prompt_ids):
        raise InvalidField(
            "num_output_tokens",
            f"num_output_tokens must be in [0, {len(prompt_ids)}) (the prompt's length), "
            f"got {num_output_tokens}",
        )
    max_len = limits.max_model_len
    if len(prompt_ids) >= max_len:
        raise InvalidField(
            prompt_param,
            f"This model's maximum context length is {max_len} tokens. However, your "
            f"prompt has {len(prompt_ids)} tokens, leaving no room for the completion.",
            context_length=True,
        )
    n = len(prompt_ids) - num_output_tokens  # the original prompt: max_tokens counts the rest
    if s.max_tokens is not None and n + s.max_tokens > max_len and not cap_max_tokens:
        raise InvalidField(
            "max_tokens",
            f"This model's maximum context length is {max_len} tokens. However, you "
            f"requested {n + s.max_tokens} tokens ({n} in the prompt, {s.max_tokens} in the "
            "completion). Please reduce the prompt or max_tokens.",
            context_length=True,
        )
