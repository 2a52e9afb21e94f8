"""A request's record inside a worker, and its states.

Lifecycle:  WAITING -> RUNNING -> FINISHED_*      (PREEMPTED ones go back to WAITING)
            RESERVED -> RUNNING                    (decode side of a KV handoff)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.records import Logprob, SamplingParams

if TYPE_CHECKING:
    from tandem.structured import GrammarState


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    RESERVED = enum.auto()  # blocks reserved, waiting for KV from a prefill server
    FINISHED_STOPPED = enum.auto()  # EOS or a stop token
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASON


# The one table from finish states to OpenAI's finish_reason.
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def finish_reason(status: RequestStatus) -> str | None:
    return _FINISH_REASON.get(status)


@dataclass(slots=True, eq=False)  # identity: queues look requests up by object
class Request:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_total_tokens: int = 0  # prompt + output cap (max_model_len)
    status: RequestStatus = RequestStatus.WAITING
    # all tokens so far: prompt, then outputs; KV exists for the first num_computed_tokens
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at (last) admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks, in order
    num_registered_blocks: int = 0  # block_table[:n] already offered to the prefix cache
    logprobs: list[Logprob] = field(default_factory=list)
    num_preemptions: int = 0
    # set by a prefill-only worker: keep the blocks after finishing until released
    hold_blocks: bool = False
    # async scheduling (tandem/engine.py): tokens sampled by a launched step not processed yet
    # (0 or 1), the row of the last one in that step's sampled tokens, and the id of the last
    # step that computed this request (its KV writes may still be running on the GPU)
    num_pending_tokens: int = 0
    pending_row: int = -1
    step_id: int = -1
    # set when the scheduler takes the request (prepare_limits), read on every step
    max_num_tokens: int = 0  # prompt + max_output_tokens: "length" when reached
    min_num_tokens: int = 0  # prompt + min_tokens: no stop before it
    stop_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    # structured outputs (tandem/structured.py): the matcher that masks this request's
    # tokens; set by the engine at admission, None when unconstrained
    grammar: GrammarState | None = None
    # greedy with nothing to do per row (bias, penalties, min_tokens, logprobs, a grammar):
    # the sampler's fast path (set from params at construction; params do not change)
    plain_greedy: bool = False

    def prepare_limits(self) -> None:
        p = self.params
        self.max_num_tokens = self.num_prompt_tokens + self.max_output_tokens
        self.min_num_tokens = self.num_prompt_tokens + p.min_tokens
        eos = frozenset() if p.ignore_eos else self.eos_token_ids
        self.stop_ids = eos | frozenset(p.stop_token_ids)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        p = self.params
        self.plain_greedy = (
            p.greedy
            and not p.logit_bias
            and not p.needs_penalties
            and not p.min_tokens
            and p.logprobs is None
            and p.structured is None
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens the scheduler counts: those known plus those being sampled on the GPU."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def max_output_tokens(self) -> int:
        room = self.max_total_tokens - self.num_prompt_tokens
        if self.params.max_tokens is None:
            return room
        return min(self.params.max_tokens, room)
