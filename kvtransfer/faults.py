"""Test-only fault injection for the KV handoff; every hook is off unless its environment
variable is set. Read here once, nowhere else. tests/faults/ uses them to produce faults that
natural timing cannot (a KV stream that stalls half-way); never set them in production.

TANDEM_FAULT_KV_STALL_REQ_ID=<req_id>
    The prefill server's KV push for exactly this worker req_id (router ids look like
    "<request_id>-<choice>" for a first attempt, "<request_id>-<choice>.<n>" for retry n)
    sends every KV slab but not the last chunk (the one with the first token), then stalls
    until cancelled: the receiver must hit its stall deadline and the router must retry.
    The same-host transports (shm, cuda_ipc) write every slab and hold back `done`.
    Other requests are untouched.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)

_KV_STALL_REQ_ID = os.environ.get("TANDEM_FAULT_KV_STALL_REQ_ID", "")


def stalls_kv_push(req_id: str) -> bool:
    return bool(_KV_STALL_REQ_ID) and req_id == _KV_STALL_REQ_ID


async def stall_forever(handoff_id: str) -> None:
    log.warning("event=fault_injected fault=kv_stall handoff=%s", handoff_id)
    await asyncio.Event().wait()
