"""The decode server's KVTransfer service: one Transfer call per handoff, every transport.

A call's life (the protocol: protos/worker.proto, service KVTransfer):
    begin      -> the transport's receiver checks it; the ledger entry turns RECEIVING
                  (stall deadline armed); from here until the call is over a write into the
                  reserved blocks may be in flight (Handoff.store pending) -> grant
    slab i     -> the transport's receiver stores it (grpc) or checks it (same host);
                  progress for the stall deadline
    done       -> every slab arrived: the ledger completes with token 0 -> complete
    handoff ended meanwhile (abort, lease, stall) -> stop at once; a sender that writes the
                  blocks itself is then waited for until its stream ended
    bad message, stalled or broken stream -> the handoff fails -> stop
The store resolves once the call is over and its last store on a worker thread ended, and
only then may whoever frees the blocks go on (HandoffLedger.settle).

What the handoff's capability (KVTarget.capability, presented in KVBegin) guarantees:
    - Only a caller holding it touches the handoff. A call that names an unknown handoff or
      presents a missing or wrong capability gets a stop and changes nothing: the handoff is
      not granted, advanced, failed or aborted by it, its deadlines do not move, and the
      holder's own call still goes through. (Anything before begin is checked is the same:
      a stranger's stalled or malformed call ends without touching any handoff.)
    - The holder writes only the handoff's own blocks: block_ids[first_block:], first_block
      = num_cached_tokens // block_size, from this server's ledger, never from the caller. A
      grpc chunk outside them (into the prefix-cached blocks shared with other requests, or
      past the reserved ones), or of other layers, dtype or shape than the pool's, is refused
      before any byte is stored, and fails the handoff (its blocks are freed by the request's
      cleanup as for any failed handoff). A same-host sender gets these block ids in the
      grant and writes exactly them (kvtransfer/direct_transport.py).
    - It does not say who the sender is: anyone the KVTarget reached (the router, the prefill
      server it picked) can use it once. Which peers may call KVTransfer at all is the
      channel's business (mutual TLS: prefill certificates only).
"""

from __future__ import annotations

import asyncio
import logging

from kvtransfer import wire
from kvtransfer.base import Grant, HandoffFailed, HandoffState, KVReceiver
from kvtransfer.channel import HANDOFF_ID_KEY
from kvtransfer.ledger import Handoff, HandoffLedger
from protos import worker_pb2, worker_pb2_grpc
from tandem.log_config import quote

log = logging.getLogger(__name__)

COMPLETE = worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_COMPLETE)


def _stop(error: str) -> worker_pb2.KVTransferReply:
    return worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_STOP, error=error)


def _granted(grant: Grant) -> worker_pb2.KVTransferReply:
    return worker_pb2.KVTransferReply(
        reply=worker_pb2.KV_REPLY_GRANT, block_ids=list(grant.writable)
    )


class _Unauthorized(HandoffFailed):
    """A call that did not prove it holds the handoff: refused, and nothing changes."""


class KVTransferServicer(worker_pb2_grpc.KVTransferServicer):
    """Decode side: drives the handoff ledger for every transport; `receivers` (by name: what
    this server offers) do each transport's part."""

    def __init__(self, ledger: HandoffLedger, receivers: dict[str, KVReceiver]) -> None:
        self.ledger = ledger
        self.receivers = receivers

    def _authorize(self, call_id: str, msg: worker_pb2.KVTransferMessage) -> Handoff:
        """The handoff the call's begin holds the capability of; _Unauthorized otherwise."""
        if msg.WhichOneof("kind") != "begin":
            raise _Unauthorized("a KV transfer must start with begin")
        if call_id and msg.handoff_id and msg.handoff_id != call_id:
            raise _Unauthorized("begin names another handoff than the call")
        handoff_id = call_id or msg.handoff_id
        h = self.ledger.authorize(handoff_id, msg.begin.capability)
        if h is None:  # one message for both: a stranger learns nothing about live ids
            raise _Unauthorized(
                f"handoff {handoff_id!r} is unknown or KVBegin.capability does not match it"
            )
        return h

    def _begin(self, msg: worker_pb2.KVTransferMessage) -> tuple[KVReceiver, int]:
        b = msg.begin
        rx = self.receivers.get(b.transport)
        if rx is None:
            raise HandoffFailed(f"transport {b.transport!r} is not offered here")
        if b.num_slabs < 0:
            raise HandoffFailed("num_slabs must be >= 0")
        rx.check_begin(b)
        return rx, b.num_slabs

    @staticmethod
    def _grant(rx: KVReceiver, h: Handoff) -> Grant:
        block_size = rx.kv.kv_shape[3]
        return Grant(tuple(h.block_ids), min(len(h.block_ids), h.num_cached_tokens // block_size))

    async def Transfer(self, request_iterator, context):
        call_id = dict(context.invocation_metadata()).get(HANDOFF_ID_KEY, "")
        messages = _Messages(request_iterator, self.ledger.stall_s)
        owner: Handoff | None = None  # the handoff this call proved it holds
        h: Handoff | None = None  # the one whose store this call opened
        storing: asyncio.Task | None = None  # the slab store under way (a worker thread's)
        try:
            msg = await messages.next()
            owner = self._authorize(call_id, msg)
            rx, num_slabs = self._begin(msg)
            if owner.state.terminal:
                raise HandoffFailed(
                    f"handoff {owner.handoff_id!r} is already {owner.state.value}: {owner.error}"
                )
            if owner.store is not None:  # settle waits on the first call's store: keep it
                raise HandoffFailed("a transfer for this handoff is already under way")
            h = owner
            grant = self._grant(rx, h)
            self.ledger.receiving(h)
            h.store = asyncio.get_running_loop().create_future()  # writes may land from here
            yield _granted(grant)
            slab, stopped = 0, False
            while True:
                msg = await messages.next(None if stopped else h.done)
                if msg is None:  # the handoff ended under the sender: stop it
                    stopped = True
                    yield _stop(f"handoff {h.state.value}: {h.error}")
                    if not rx.sender_writes:
                        return  # nothing of the sender's can land: no need to wait for it
                    continue
                kind = msg.WhichOneof("kind")
                if kind == rx.progress and slab < num_slabs:
                    if not stopped:
                        storing = asyncio.ensure_future(rx.receive(grant, slab, getattr(msg, kind)))
                        await asyncio.shield(storing)
                        self.ledger.receiving(h)  # progress (no-op once ended)
                    slab += 1
                    continue
                if kind != "done" or slab != num_slabs:
                    raise HandoffFailed(f"expected slab {slab} of {num_slabs} or done, got {kind}")
                _resolve(h.store)  # every slab arrived: nothing more will land
                if not stopped:
                    token, lp = wire.done_from_proto(msg.done)
                    self.ledger.complete(h, token, lp, rx.name)
                    yield COMPLETE
                return
        except _Unauthorized as e:
            log.warning("event=kv_transfer_unauthorized handoff=%s error=%s", call_id, quote(e))
            yield _stop(str(e))
        except (HandoffFailed, ValueError, RuntimeError) as e:
            if owner is None:  # before the capability was checked: nothing to fail
                log.info("event=kv_transfer_refused handoff=%s error=%s", call_id, quote(e))
            else:
                self.ledger.fail(owner.handoff_id, HandoffState.FAILED, str(e))
                log.info("event=kv_receive_failed handoff=%s error=%s", owner.handoff_id, quote(e))
            yield _stop(str(e))
        except (asyncio.CancelledError, GeneratorExit):  # the call was cancelled
            if owner is not None:
                self.ledger.fail(owner.handoff_id, HandoffState.FAILED, "sender went away")
            raise
        finally:
            messages.close()
            if h is not None and h.store is not None:  # the call is over: once its last
                if storing is None or storing.done():  # store ended, nothing more lands
                    _resolve(h.store)
                else:
                    storing.add_done_callback(lambda _, s=h.store: _resolve(s))


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


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
                raise HandoffFailed("KV transfer stream ended before done") from None
        if ended_wait is not None and ended_wait in done:
            return None
        raise HandoffFailed(f"KV transfer stalled: no message for {self._stall_s:g}s")

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()
