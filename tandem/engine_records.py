"""What the engine hands out: a step's per-request outputs, its stats, a handoff's target
blocks, and its errors (a full waiting queue, one request's failure, a dead engine); and the
prompt logprobs it collects until a request's first output carries them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from tandem.records import Logprob

if TYPE_CHECKING:
    from tandem.request import Request


class StepOutput(NamedTuple):
    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprob | None]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    num_cached_tokens: int
    error: str = ""  # why, when finish_reason is "error" (the engine failed this request)
    # SamplingParams.prompt_logprobs: on the request's first output only, one entry per prompt
    # token from the second on (token i given tokens < i, with its top-k); None otherwise
    prompt_logprobs: list[Logprob] | None = None


class PromptSpan(NamedTuple):
    """Prompt positions [start, end) of one step's chunk whose logits give prompt logprobs:
    the logits at position j score prompt token j + 1."""

    chunk: int  # the chunk's index in the step
    start: int
    end: int


class PromptLogprobs:
    """Prompt logprobs of the requests that ask (SamplingParams.prompt_logprobs), collected
    chunk by chunk until the request's first output takes them (once).

        entries[req_id]:  [lp, ...]  asked for; prompt tokens 1..len computed so far
                          None       handed out: nothing more is computed
        (absent: the request did not ask, or left the engine)

    A request recomputed before its first output (preemption, a failed step) skips the
    positions it has entries for, so none is added twice. The engine asks, takes and
    forgets; the runner computes.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[str, list[Logprob] | None] = {}

    def ask(self, req: Request) -> bool:
        """Whether req asks for prompt logprobs (then they are collected from now on)."""
        if req.params.prompt_logprobs is None:
            return False
        self.entries[req.req_id] = []
        return True

    def spans(self, chunks) -> list[PromptSpan]:
        """Where the step's chunks need prompt logprobs (empty for most steps)."""
        if not self.entries:
            return []
        out = []
        for i, (req, n) in enumerate(chunks):
            got = self.entries.get(req.req_id)
            if got is None:
                continue
            c = req.num_computed_tokens
            start, end = max(c, len(got)), min(c + n, req.num_prompt_tokens - 1)
            if start < end:
                out.append(PromptSpan(i, start, end))
        return out

    def add(self, req_id: str, entries: list[Logprob]) -> None:
        got = self.entries.get(req_id)
        if got is not None:
            got.extend(entries)

    def take(self, req_id: str) -> list[Logprob] | None:
        """The entries, once (with the request's first output); None afterwards."""
        got = self.entries.get(req_id)
        if got is not None:
            self.entries[req_id] = None
        return got

    def forget(self, req_id: str) -> None:
        self.entries.pop(req_id, None)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_cached_blocks: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int


class EngineFullError(RuntimeError):
    """The waiting queue is at its bound (max_num_waiting): refused, nothing was added."""


class EngineDeadError(RuntimeError):
    """The engine cannot go on (a step failed, repeatedly or beyond repair): no request in it
    can finish (AsyncEngine); the server reports NOT_SERVING and exits."""


class RequestFailed(RuntimeError):
    """Processing one request raised (its row of a step, in the sampler): that request
    alone is failed, and the step's other requests are computed again (tandem/recovery.py)."""

    def __init__(self, req_id: str, cause: BaseException) -> None:
        super().__init__(f"request {req_id!r} failed: {cause!r}")
        self.req_id = req_id


class HandoffTarget(NamedTuple):
    block_ids: list[int]
    num_cached_tokens: int  # block-aligned prefix already in this pool (not to be sent)
