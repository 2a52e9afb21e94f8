r"""Decode-side handoff ledger: one entry per reserved handoff, explicit states, leases.

    reserve --> RESERVED --first chunk--> RECEIVING --last chunk--> COMPLETE
                  |  \________________________|
                  +--abort / lease expiry / bad chunk--> RECLAIMED | FAILED

`wait` is what the Decode.Generate stream awaits; a terminal state other than COMPLETE makes
it raise, and the stream's cleanup frees the blocks (through the engine's idempotent abort).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kvtransfer.base import HandoffState
from tandem.request import Logprob


class HandoffFailed(RuntimeError):
    pass


@dataclass
class Handoff:
    handoff_id: str
    req_id: str
    block_ids: list[int]
    num_cached_tokens: int
    deadline: float  # monotonic time after which the blocks are reclaimed
    state: HandoffState = HandoffState.RESERVED
    first_token_id: int = -1
    first_logprob: Logprob | None = None
    error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class HandoffLedger:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.handoffs: dict[str, Handoff] = {}

    def open(
        self, handoff_id: str, req_id: str, block_ids: list[int], num_cached_tokens: int
    ) -> Handoff:
        h = Handoff(
            handoff_id, req_id, block_ids, num_cached_tokens, time.monotonic() + self.lease_s
        )
        self.handoffs[handoff_id] = h
        return h

    def get_active(self, handoff_id: str) -> Handoff:
        h = self.handoffs.get(handoff_id)
        if h is None or h.state.terminal:
            raise HandoffFailed(
                f"handoff {handoff_id!r} is unknown or already {h.state.value if h else 'gone'}"
            )
        return h

    def receiving(self, h: Handoff) -> None:
        h.state = HandoffState.RECEIVING

    def complete(self, h: Handoff, first_token_id: int, first_logprob: Logprob | None) -> None:
        h.first_token_id, h.first_logprob = first_token_id, first_logprob
        self._end(h, HandoffState.COMPLETE)

    def fail(self, handoff_id: str, state: HandoffState, error: str) -> None:
        """Idempotent: failing a finished or unknown handoff does nothing."""
        h = self.handoffs.get(handoff_id)
        if h is not None and not h.state.terminal:
            h.error = error
            self._end(h, state)

    def _end(self, h: Handoff, state: HandoffState) -> None:
        h.state = state
        h.done.set()

    async def wait(self, h: Handoff) -> Handoff:
        """Until the handoff ends; the lease bounds the wait. Raises unless COMPLETE."""
        try:
            await asyncio.wait_for(h.done.wait(), timeout=max(0.0, h.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.fail(
                h.handoff_id, HandoffState.RECLAIMED, f"no KV within the {self.lease_s:.0f}s lease"
            )
        if h.state != HandoffState.COMPLETE:
            raise HandoffFailed(f"handoff {h.handoff_id} {h.state.value}: {h.error}")
        return h

    def close(self, handoff_id: str) -> None:
        self.handoffs.pop(handoff_id, None)

    @property
    def num_active(self) -> int:
        return sum(not h.state.terminal for h in self.handoffs.values())
