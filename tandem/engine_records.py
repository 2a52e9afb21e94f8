"""What the engine hands out: a step's per-request outputs, its stats, a handoff's target
blocks, and its errors (a full waiting queue, a dead engine thread)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from tandem.records import Logprob


class StepOutput(NamedTuple):
    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprob | None]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    num_cached_tokens: int


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
    """The engine thread's step failed: no request in it can finish (AsyncEngine)."""


class HandoffTarget(NamedTuple):
    block_ids: list[int]
    num_cached_tokens: int  # block-aligned prefix already in this pool (not to be sent)
