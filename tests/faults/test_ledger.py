"""The handoff ledger on its own: states, idempotent abort, lease and stall deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvtransfer.base import HandoffState
from kvtransfer.ledger import HandoffFailed, HandoffLedger


def test_complete_wakes_the_waiter_and_later_aborts_do_nothing():
    async def main():
        ledger = HandoffLedger(lease_s=5, stall_s=1)
        h = ledger.open("h1", "r1", [3, 4], 0)
        waiter = asyncio.create_task(ledger.wait(h))
        ledger.receiving(h)
        ledger.complete(h, 42, None)
        assert (await waiter).first_token_id == 42
        assert ledger.abort_request("r1") == []  # already complete: nothing to reclaim
        assert not ledger.fail("h1", HandoffState.FAILED, "late")
        assert h.state == HandoffState.COMPLETE and ledger.num_active == 0

    asyncio.run(main())


def test_abort_by_request_is_idempotent_and_cancels_the_attached_task():
    async def main():
        ledger = HandoffLedger(lease_s=5)
        h1, h2 = ledger.open("a#0", "a"), ledger.open("a#1", "a")
        other = ledger.open("b#0", "b")
        push = asyncio.create_task(asyncio.sleep(60))
        h1.task = push
        assert [h.handoff_id for h in ledger.abort_request("a")] == ["a#0", "a#1"]
        assert ledger.abort_request("a") == []
        await asyncio.sleep(0)
        assert push.cancelled()
        assert h1.state == h2.state == HandoffState.RECLAIMED
        assert other.state == HandoffState.RESERVED and ledger.num_active == 1
        with pytest.raises(HandoffFailed, match="reclaimed"):
            await ledger.wait(h1)
        with pytest.raises(HandoffFailed):
            ledger.complete(h1, 1, None)  # a late last chunk cannot revive it

    asyncio.run(main())


def test_lease_reclaims_a_handoff_that_never_starts():
    async def main():
        ledger = HandoffLedger(lease_s=0.2, stall_s=5)
        h = ledger.open("h", "r")
        t0 = time.monotonic()
        with pytest.raises(HandoffFailed, match="lease"):
            await ledger.wait(h)
        assert 0.15 < time.monotonic() - t0 < 2
        assert h.state == HandoffState.RECLAIMED

    asyncio.run(main())


def test_progress_extends_the_deadline_and_a_stall_fails_long_before_the_lease():
    async def main():
        ledger = HandoffLedger(lease_s=60, stall_s=0.3)
        h = ledger.open("h", "r")
        waiter = asyncio.create_task(ledger.wait(h))
        t0 = time.monotonic()
        for _ in range(4):  # chunks every 0.2 s keep it alive past one stall period
            ledger.receiving(h)
            await asyncio.sleep(0.2)
        assert not waiter.done()
        with pytest.raises(HandoffFailed, match="stalled"):
            await waiter
        assert 0.9 < time.monotonic() - t0 < 3

    asyncio.run(main())


def test_settle_waits_for_an_in_flight_chunk_write():
    async def main():
        ledger = HandoffLedger(lease_s=5)
        h = ledger.open("h", "r")
        loop = asyncio.get_running_loop()
        h.store = loop.run_in_executor(None, time.sleep, 0.2)
        ledger.abort_request("r")
        await ledger.settle(h)
        assert h.store.done()

    asyncio.run(main())
