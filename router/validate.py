"""Request checks shared by every client of the router (the gateway checks again, for HTTP).

The sampling and token rules themselves live in the core (tandem/validation.py), which the
workers apply at their own boundary too; this module adds what only the public API has
(prompt text, chat messages, n) and turns a refusal into a RequestError with its param.

The bounds on sizes keep one gRPC request (up to 64 MiB) from costing unbounded tokenizer time
or worker memory; they sit above the gateway's defaults, which are the tighter, tunable ones.
"""

from __future__ import annotations

from router.types import ErrorKind, GenerateInput, RequestError
from tandem.validation import (  # noqa: F401 - the bounds, re-exported for the router's users
    MAX_LOGIT_BIAS,
    MAX_STOP_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    InvalidField,
    RequestLimits,
    check_prompt,
    check_sampling,
)

MAX_MESSAGES = 4096
MAX_PROMPT_CHARS = 1 << 23  # prompt text, or a chat's summed message text, before tokenizing


def _bad(param: str, message: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_ARGUMENT, message, param=param)


def validate_input(gi: GenerateInput, max_n: int, max_top_logprobs: int = MAX_TOP_LOGPROBS) -> None:
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
    try:
        check_sampling(gi.sampling, gi.top_logprobs, max_top_logprobs)
    except InvalidField as e:
        raise _bad(e.param, e.message) from None


def validate_prompt(gi: GenerateInput, prompt_ids: list[int], vocab_size: int, max_model_len: int):
    """Token-level checks; fills sampling.max_tokens when unset."""
    param = "messages" if gi.messages is not None else "prompt"
    s = gi.sampling
    try:
        check_prompt(prompt_ids, s, RequestLimits(vocab_size, max_model_len), param)
    except InvalidField as e:
        kind = ErrorKind.CONTEXT_LENGTH if e.context_length else ErrorKind.INVALID_ARGUMENT
        raise RequestError(kind, e.message, param=e.param) from None
    if s.max_tokens is None:
        s.max_tokens = max_model_len - len(prompt_ids)
