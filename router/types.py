"""Boundary records of the router engine (no protobuf past the servicers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from router.tool_parsers import ToolCallDelta
from tandem.records import Logprob, SamplingParams, Usage


class FinishReason(enum.IntEnum):
    # Values equal tandem.v1.FinishReason so the servicers convert with int().
    NONE = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    CONTEXT_LENGTH = "context_length_exceeded"
    NOT_FOUND = "not_found"
    OVERLOADED = "overloaded"  # too many requests: retry later (429)
    UNAVAILABLE = "unavailable"  # no worker can take it (503)
    INTERNAL = "internal"


class RequestError(Exception):
    """A request the router refuses or could not serve; servicers map kind to a status code."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param  # the offending request field, for OpenAI's error.param
        self.retry_after = retry_after  # seconds, for Retry-After


@dataclass(slots=True)
class GenerateInput:
    """One public Generate call after proto conversion."""

    request_id: str
    model: str
    text: str | None = None
    # [{"role", "content", optional "name"}] as the chat template sees them, OpenAI's shape:
    # assistant turns may add "tool_calls" [{"id", "type": "function", "function": {"name",
    # "arguments"}}] (arguments a dict when its JSON text parses to one, as HF templates want)
    # and "reasoning_content"; tool turns add "tool_call_id"
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    # as sent, unchecked (router/validate.py checks it), with the request's stop strings and
    # detokenization settings; max_tokens None until validation fills it
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=None))
    # tandem.v1.SamplingParams.top_logprobs as sent: checked even when logprobs is off, as the
    # public API always has (sampling.logprobs holds it when on)
    top_logprobs: int = 0
    n: int = 1
    echo: bool = False
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    # chat only: the functions the model may call, OpenAI function dicts {"name",
    # "description", "parameters" (a JSON Schema dict), optional "strict"}
    tools: list[dict] | None = None
    # "none" | "auto" | "required" | a function name; None: "auto" with tools, else "none"
    # (router/validate.py settles it)
    tool_choice: str | None = None
    # chat only: extra variables for the chat template (e.g. {"enable_thinking": False})
    chat_template_kwargs: dict = field(default_factory=dict)

    def template_tools(self) -> list[dict] | None:
        """The tools as HF chat templates take them: [{"type": "function", "function": ...}]."""
        if not self.tools:
            return None
        return [{"type": "function", "function": f} for f in self.tools]


@dataclass(slots=True)
class Timing:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prefill_worker: str = ""
    decode_worker: str = ""


@dataclass(slots=True)
class ChoiceChunk:
    """A piece of one choice's output, as the engine streams it to the servicer.

    Not router.client.Chunk, although both are "a piece of one choice": that one is the
    client's view of the wire message (finish_reason as OpenAI's string, logprobs as the
    TokenLogprob messages with their token text, the request id); this one is the engine's,
    before the servicer adds text to logprobs and converts (enum, timing, echo, cache counts).
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    stop_reason: str = ""
    timing: Timing | None = None
    usage: Usage | None = None  # only on the very last chunk of the request
    prompt_token_ids: list[int] = field(default_factory=list)  # echo, first chunk
    num_cached_tokens: int = 0  # final chunk: prompt tokens served from a prefix cache
    # --reasoning-parser: the thinking part of this piece of output (kept out of text)
    reasoning_text: str = ""
    # pieces of tool calls parsed from (or forced on) the output; their text is not in text
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # SamplingParams.prompt_logprobs, first chunk: one entry per prompt token from the second
    prompt_logprobs: list[Logprob] = field(default_factory=list)
