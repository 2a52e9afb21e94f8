"""The decode server's side of the same-host KV transports: KVTransfer.Write (the protocol and
why it is shaped so: kvtransfer/direct_transport.py)."""

from __future__ import annotations

import asyncio
import logging

import torch

from kvtransfer.base import HandoffState
from kvtransfer.grpc_transport import HANDOFF_ID_KEY, KVTransferServicer, KVWrite
from kvtransfer.ledger import HandoffFailed, HandoffLedger
from kvtransfer.pool import PoolExport
from protos import worker_pb2
from worker.convert import logprob_from_proto

log = logging.getLogger(__name__)


class SameHostKVTransferServicer(KVTransferServicer):
    """Decode side: KVTransfer with Write for the same-host transports this server offers
    (Push, the grpc transport, stays)."""

    def __init__(
        self,
        ledger: HandoffLedger,
        kv_cache: torch.Tensor,
        offered: list[str],
        export: PoolExport | None,
        kv_shape: tuple[int, ...] | None = None,
        write: KVWrite | None = None,
    ) -> None:
        """kv_shape/write: the grpc transport's tensor-parallel hooks (KVTransferServicer);
        the same-host transports are offered only at tensor-parallel size 1."""
        super().__init__(ledger, kv_cache, kv_shape, write)
        self.offered = offered
        self.export = export

    def _check_begin(self, msg: worker_pb2.KVWriteMessage) -> worker_pb2.KVWriteBegin:
        if msg.WhichOneof("kind") != "begin":
            raise HandoffFailed("KV write must start with begin")
        b = msg.begin
        if b.transport == "grpc" or b.transport not in self.offered or self.export is None:
            raise HandoffFailed(f"transport {b.transport!r} is not offered here")
        if b.pool_id != self.export.pool_id:
            raise HandoffFailed("the sender opened another pool (a previous server's)")
        if b.num_slabs < 1:
            raise HandoffFailed("num_slabs must be >= 1")
        return b

    async def Write(self, request_iterator, context):
        handoff_id = dict(context.invocation_metadata()).get(HANDOFF_ID_KEY, "")
        messages = _Messages(request_iterator, self.ledger.stall_s)
        h = None
        try:
            msg = await messages.next()
            handoff_id = handoff_id or msg.handoff_id
            begin = self._check_begin(msg)
            h = self.ledger.get_active(handoff_id)
            self.ledger.receiving(h)
            # granted: until done (or the end of the sender's stream) a write into h's blocks
            # may be in flight, so whoever frees them waits for this first (settle)
            h.store = asyncio.get_running_loop().create_future()
            yield worker_pb2.KVWriteReply(ok=True)
            stopped = False
            next_slab = 0
            while True:
                msg = await messages.next(None if stopped else h.done)
                if msg is None:  # the handoff ended under the sender: stop it
                    stopped = True
                    yield worker_pb2.KVWriteReply(ok=False, error=f"handoff {h.state.value}")
                    continue
                kind = msg.WhichOneof("kind")
                if kind == "written_slab" and msg.written_slab == next_slab < begin.num_slabs:
                    next_slab += 1
                    self.ledger.receiving(h)  # progress (no-op once ended)
                    continue
                if kind != "done" or next_slab != begin.num_slabs:
                    raise HandoffFailed(f"expected slab {next_slab} or done, got {kind}")
                h.store.set_result(None)  # every slab written: nothing more will land
                if not stopped:
                    done = msg.done
                    has_lp = done.HasField("first_token_logprob")
                    lp = logprob_from_proto(done.first_token_logprob, has_lp)
                    self.ledger.complete(
                        self.ledger.get_active(handoff_id), done.first_token_id, lp,
                        begin.transport,
                    )  # fmt: skip
                    yield worker_pb2.KVWriteReply(ok=True)
                return
        except (HandoffFailed, ValueError, RuntimeError) as e:
            self.ledger.fail(handoff_id, HandoffState.FAILED, str(e))
            log.info("event=kv_write_failed handoff=%s error=%s", handoff_id, e)
            yield worker_pb2.KVWriteReply(ok=False, error=str(e))
        except asyncio.CancelledError:
            self.ledger.fail(handoff_id, HandoffState.FAILED, "sender went away")
            raise
        finally:
            messages.close()
            if h is not None and h.store is not None and not h.store.done():
                h.store.set_result(None)  # the sender's stream is over: it writes no more


class _Messages:
    """The sender's messages, each within the stall deadline; or None when `ended` (an event)
    is set first. One read stays pending across calls (an abandoned read would lose a
    message)."""

    def __init__(self, request_iterator, stall_s: float) -> None:
        self._it = request_iterator.__aiter__()
        self._stall_s = stall_s
        self._read: asyncio.Future | None = None

    async def next(self, ended: asyncio.Event | None = None):
        if self._read is None:
            self._read = asyncio.ensure_future(anext(self._it))
        waits = {self._read}
        ended_wait = None
        if ended is not None:
            ended_wait = asyncio.ensure_future(ended.wait())
            waits.add(ended_wait)
        try:
            done, _ = await asyncio.wait(
                waits, timeout=self._stall_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if ended_wait is not None:
                ended_wait.cancel()
        if self._read in done:
            read, self._read = self._read, None
            try:
                return read.result()
            except StopAsyncIteration:
                raise HandoffFailed("KV write stream ended before done") from None
        if ended_wait is not None and ended_wait in done:
            return None
        raise HandoffFailed(f"KV write stalled: no message for {self._stall_s:g}s")

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()
