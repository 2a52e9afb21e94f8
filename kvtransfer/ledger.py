r"""Handoff ledger: one entry per KV handoff, explicit states, deadlines, idempotent abort.

Both ends of a handoff keep one (same id: the decode server's KVTarget.handoff_id):

    decode (receiver)  open at reserve: RESERVED --begin--> RECEIVING --done--> COMPLETE
    prefill (sender)   open at Prefill:  RESERVED --push starts--> RECEIVING --pushed--> COMPLETE
                              \_____________________|
                               +--abort / deadline / bad slab / peer gone--> RECLAIMED | FAILED

Deadlines: RESERVED lasts at most the lease (the decode side cannot know how long the prompt
waits and computes on the prefill server); RECEIVING must see progress every `stall_s` (each
slab extends it), so a stalled transfer fails long before the lease. `wait` is what the decode
Generate stream awaits; a terminal state other than COMPLETE makes it raise, and the stream's
cleanup frees the blocks (through the engine's idempotent abort). `fail` / `abort_request`
are idempotent and may come from any side (router Abort, sender error, receiver error,
deadline); ending an entry also cancels the task attached to it (the sender's push).

Each entry carries a capability, unguessable bytes issued at open: the decode server hands it
out in the handoff's KVTarget only, and `authorize` is how a Transfer call proves it holds
it (constant-time compare). Nothing else about an entry is secret (its id is guessable).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from kvtransfer.base import HandoffFailed, HandoffState
from tandem.records import Logprob

DEFAULT_STALL_S = 5.0  # longest gap between two messages of one KV transfer
CAPABILITY_BYTES = 32  # a handoff's capability (128 bits would do; 256 costs nothing)


def new_capability() -> bytes:
    return secrets.token_bytes(CAPABILITY_BYTES)


@dataclass
class Handoff:
    handoff_id: str
    req_id: str
    block_ids: list[int]
    num_cached_tokens: int
    deadline: float  # monotonic time after which the handoff is reclaimed (moves on progress)
    state: HandoffState = HandoffState.RESERVED
    first_token_id: int = -1
    first_logprob: Logprob | None = None
    error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None  # cancelled when the handoff ends early (sender's push)
    # receiver: done once no write into block_ids can be in flight: set from the grant until
    # the transfer call is over and its last store ended (a grpc chunk stored on a worker
    # thread runs on when its coroutine is cancelled; a same-host sender writes until its
    # stream ended: kvtransfer/direct_transport.py); whoever frees the blocks awaits it first
    store: asyncio.Future | None = None
    # what a Transfer call must present to touch this handoff (KVTarget.capability)
    capability: bytes = field(default_factory=new_capability, repr=False)


class HandoffLedger:
    def __init__(self, lease_s: float, stall_s: float = DEFAULT_STALL_S) -> None:
        if lease_s <= 0 or stall_s <= 0:
            raise ValueError("lease_s and stall_s must be > 0")
        self.lease_s = lease_s
        self.stall_s = stall_s
        self.handoffs: dict[str, Handoff] = {}
        self.num_completed: Counter[str] = Counter()  # completed handoffs by transport

    def open(
        self,
        handoff_id: str,
        req_id: str,
        block_ids: list[int] | None = None,
        num_cached_tokens: int = 0,
    ) -> Handoff:
        if handoff_id in self.handoffs:
            raise HandoffFailed(f"handoff {handoff_id!r} is already open")
        h = Handoff(
            handoff_id,
            req_id,
            list(block_ids or ()),
            num_cached_tokens,
            time.monotonic() + self.lease_s,
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

    def authorize(self, handoff_id: str, capability: bytes) -> Handoff | None:
        """The handoff, if `capability` is its own; None otherwise (unknown id, or a wrong or
        missing capability: the caller must then change nothing about it)."""
        h = self.handoffs.get(handoff_id)
        if h is None or not capability or not hmac.compare_digest(h.capability, capability):
            return None
        return h

    def receiving(self, h: Handoff) -> None:
        """Progress: the transfer is alive; the next message is due within stall_s."""
        if not h.state.terminal:
            h.state = HandoffState.RECEIVING
            h.deadline = time.monotonic() + self.stall_s

    def complete(
        self, h: Handoff, first_token_id: int = -1, first_logprob=None, transport: str = "grpc"
    ) -> None:
        if h.state.terminal:
            raise HandoffFailed(f"handoff {h.handoff_id!r} already {h.state.value}: {h.error}")
        h.first_token_id, h.first_logprob = first_token_id, first_logprob
        self.num_completed[transport] += 1
        h.task = None  # the task is what completed it
        self._end(h, HandoffState.COMPLETE)

    def fail(self, handoff_id: str, state: HandoffState, error: str) -> bool:
        """Idempotent: failing a finished or unknown handoff does nothing (returns False)."""
        h = self.handoffs.get(handoff_id)
        if h is None or h.state.terminal:
            return False
        h.error = error
        self._end(h, state)
        return True

    def abort_request(self, req_id: str, error: str = "aborted") -> list[Handoff]:
        """Reclaim every open handoff of req_id (Abort RPC from the router or a peer); the
        ones this call ended."""
        hs = [h for h in self.handoffs.values() if h.req_id == req_id]
        return [h for h in hs if self.fail(h.handoff_id, HandoffState.RECLAIMED, error)]

    def _end(self, h: Handoff, state: HandoffState) -> None:
        h.state = state
        h.done.set()
        task, h.task = h.task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    async def wait(self, h: Handoff) -> Handoff:
        """Until the handoff ends or its deadline (lease, then stall) passes. Raises unless
        COMPLETE."""
        while not h.done.is_set():
            left = h.deadline - time.monotonic()
            if left <= 0:
                if h.state == HandoffState.RESERVED:
                    why = f"no KV within the {self.lease_s:g}s lease"
                else:
                    why = f"KV stream stalled: no progress for {self.stall_s:g}s"
                self.fail(h.handoff_id, HandoffState.RECLAIMED, why)
                break
            try:
                await asyncio.wait_for(h.done.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass  # re-check: progress may have moved the deadline
        if h.state != HandoffState.COMPLETE:
            raise HandoffFailed(f"handoff {h.handoff_id} {h.state.value}: {h.error}")
        return h

    async def settle(self, h: Handoff) -> None:
        """Until no write into h's blocks is in flight (call before freeing them)."""
        store = h.store
        if store is not None and not store.done():
            await asyncio.wait([store])

    def close(self, handoff_id: str) -> None:
        self.handoffs.pop(handoff_id, None)

    @property
    def num_active(self) -> int:
        return sum(not h.state.terminal for h in self.handoffs.values())
