"""What the engine hands out: a step's per-request outputs, its stats, a handoff's target
blocks, and its errors (a full waiting queue, one request's failure, a dead engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from tandem.records import Logprob


class StepOutput(NamedTuple):
    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprob | None]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    num_cached_tokens: int
    error: str = ""  # why, when finish_reason is "error" (the engine failed this request)


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
