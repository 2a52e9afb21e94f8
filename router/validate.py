"""Request checks shared by every client of the router (the gateway checks again, for HTTP).

The bounds on sizes keep one gRPC request (up to 64 MiB) from costing unbounded tokenizer time
or worker memory; they sit above the gateway's defaults, which are the tighter, tunable ones.
"""

from __future__ import annotations

import math

from router.types import ErrorKind, GenerateInput, RequestError

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_MESSAGES = 4096
MAX_PROMPT_CHARS = 1 << 23  # prompt text, or a chat's summed message text, before tokenizing


def _bad(param: str, message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, message, param=param)


def validate_input(gi: GenerateInput, max_n: int) -> None:
    """Everything that does not need the tokenized prompt."""
    given = [x is not None for x in (gi.text, gi.messages, gi.prompt_token_ids)]
    if not any(given):
        raise _bad("prompt", "one of prompt text, chat messages or token ids is required")
    if gi.messages is not None:
        if not gi.messages:
            raise _bad("messages", "messages must not be empty")
        if len(gi.messages) > MAX_MESSAGES:
            raise _bad("messages", f"at most {MAX_MESSAGES} messages")
        for i, m in enumerate(gi.messages):
            if not m.get("role"):
                raise _bad(f"messages[{i}].role", "every message needs a role")
        if sum(len(m.get("content") or "") for m in gi.messages) > MAX_PROMPT_CHARS:
            raise _bad("messages", f"the messages hold more than {MAX_PROMPT_CHARS} characters")
    if gi.text is not None and len(gi.text) > MAX_PROMPT_CHARS:
        raise _bad("prompt", f"the prompt has more than {MAX_PROMPT_CHARS} characters")
    if not 1 <= gi.n <= max_n:
        raise _bad("n", f"n must be between 1 and {max_n}, got {gi.n}")
    s = gi.sampling
    if len(s.stop) > MAX_STOP_STRINGS or any(not 0 < len(x) <= MAX_STOP_LEN for x in s.stop):
        raise _bad(
            "stop", f"stop takes at most {MAX_STOP_STRINGS} strings of 1..{MAX_STOP_LEN} characters"
        )
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
        ("top_logprobs", gi.top_logprobs, 0 <= gi.top_logprobs <= MAX_TOP_LOGPROBS,
         f"in [0, {MAX_TOP_LOGPROBS}]"),
    ]  # fmt: skip
    for name, value, ok, rule in checks:
        if not ok:
            raise _bad(name, f"{name} must be {rule}, got {value}")
    if s.max_tokens is not None and s.min_tokens > s.max_tokens:
        raise _bad("min_tokens", "min_tokens must not exceed max_tokens")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise _bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
    if len(s.logit_bias) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
    for v in s.logit_bias.values():
        if not -100 <= v <= 100:
            raise _bad("logit_bias", "logit_bias values must be in [-100, 100]")


def validate_prompt(gi: GenerateInput, prompt_ids: list[int], vocab_size: int, max_model_len: int):
    """Token-level checks; fills sampling.max_tokens when unset."""
    param = "messages" if gi.messages is not None else "prompt"
    if not prompt_ids:
        raise _bad(param, "the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise _bad(param, f"token ids must be in [0, {vocab_size})")
    s = gi.sampling
    for name, ids in (("logit_bias", s.logit_bias), ("stop_token_ids", s.stop_token_ids)):
        if any(not 0 <= t < vocab_size for t in ids):
            raise _bad(name, f"{name} token ids must be in [0, {vocab_size})")
    n = len(prompt_ids)
    if n >= max_model_len:
        raise RequestError(
            ErrorKind.CONTEXT_LENGTH,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {n} tokens, leaving no room for the completion.",
            param=param,
        )
    if s.max_tokens is None:
        s.max_tokens = max_model_len - n
    elif n + s.max_tokens > max_model_len:
        raise RequestError(
            ErrorKind.CONTEXT_LENGTH,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {n + s.max_tokens} tokens ({n} in the prompt, {s.max_tokens} in the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
