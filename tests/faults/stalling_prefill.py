"""Test-only: `tandem prefill` whose KV push for one request stalls before its last message.

    python tests/faults/stalling_prefill.py --stall-kv-req-id REQ_ID <tandem prefill args>

The push for exactly that worker req_id (router ids look like "<request_id>-<choice>" for a
first attempt, "<request_id>-<choice>.<n>" for retry n) sends every slab (grpc: every chunk;
shm / cuda_ipc: writes every slab) but not `done`, the last message, which carries the first
token; then it stalls until cancelled: the receiver must hit its stall deadline and the
router must retry, or an abort must find the handoff under way. Other requests are
untouched. tests/faults/fault_stack.py starts this in place of `tandem prefill`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from kvtransfer.channel import TransferCall  # noqa: E402
from prefill_service.server import main as prefill_main  # noqa: E402

log = logging.getLogger("tandem.faults")


def stall_kv_push(req_id: str) -> None:
    """Every registered sender ends its push with TransferCall.finish (done, then the
    receiver's complete): for req_id, it stalls instead."""
    finish = TransferCall.finish

    async def finish_or_stall(self: TransferCall, first_token_id, first_logprob) -> None:
        if self.dest.req_id != req_id:
            return await finish(self, first_token_id, first_logprob)
        log.warning("event=fault_injected fault=kv_stall handoff=%s", self.dest.handoff_id)
        await asyncio.Event().wait()

    TransferCall.finish = finish_or_stall


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--stall-kv-req-id":
        raise SystemExit(__doc__)
    stall_kv_push(argv[1])
    prefill_main(argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
