"""The gRPC side of a handoff, sender's end: channels to decode servers and one
KVTransfer.Transfer call (the protocol is in protos/worker.proto, service KVTransfer).

    TransferCall: begin -> grant -> send(slab message) ... -> finish(token 0) -> complete
                  a stop may come at any time after begin: `stopped` turns True, the sender
                  sends nothing more, finish() ends the stream and raises HandoffRefused
"""

from __future__ import annotations

import asyncio

import grpc

from kvtransfer import wire
from kvtransfer.base import HandoffRefused, KVDest
from protos import worker_pb2, worker_pb2_grpc
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel
from tandem.records import Logprob

MAX_MESSAGE_BYTES = 64 * 2**20  # channel/server limit; grpc chunks aim far below it
HANDOFF_ID_KEY = "tandem-handoff-id"  # call metadata: KVTarget.handoff_id of the call
# HTTP/2 keepalive: a peer that stops answering pings (SIGSTOP, host gone, cable pulled: no
# TCP reset) fails every call on the connection within ~15 s, busy or idle, so streams and
# handoffs to it end instead of hanging. A live process answers pings from gRPC's own I/O
# even while its engine is busy. Servers must accept pings this often (the last two).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
]

GRANT, STOP, COMPLETE = (
    worker_pb2.KV_REPLY_GRANT,
    worker_pb2.KV_REPLY_STOP,
    worker_pb2.KV_REPLY_COMPLETE,
)


class Channels:
    """A prefill server's channels, one per decode address, shared by every transport."""

    def __init__(self, timeout_s: float = 60.0, tls: TLSConfig = PLAINTEXT) -> None:
        self.timeout_s = timeout_s  # a whole handoff (--kv-push-timeout)
        self.tls = tls  # the prefill server's files, as client credentials
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            # only a holder of a decode certificate gets the KV (under role certificates)
            ch = aio_channel(address, self.tls, CHANNEL_OPTIONS, peer_role="decode")
            self._channels[address] = ch
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class TransferCall:
    """One handoff's KVTransfer.Transfer call, sender side. Use as `async with`: leaving it
    cancels the call if it is still open (the receiver sees that at once)."""

    def __init__(self, channels: Channels, dest: KVDest) -> None:
        self.dest = dest
        stub = worker_pb2_grpc.KVTransferStub(channels.channel(dest.address))
        self.call = stub.Transfer(
            timeout=channels.timeout_s, metadata=((HANDOFF_ID_KEY, dest.handoff_id),)
        )
        self._answer: asyncio.Future | None = None  # the pending read: a stop, or complete

    async def __aenter__(self) -> TransferCall:
        return self

    async def __aexit__(self, kind, exc, tb) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()
        self.call.cancel()  # no-op once finished

    async def begin(self, transport: str, num_slabs: int, pool_id: str = "") -> tuple[int, ...]:
        """Presents the handoff's capability (issued by the decode server in its KVTarget);
        returns once granted, with the decode-side block ids this call may write; raises
        HandoffRefused when the receiver said no."""
        begin = worker_pb2.KVBegin(
            transport=transport,
            pool_id=pool_id,
            num_slabs=num_slabs,
            capability=self.dest.capability,
        )
        await self._write(worker_pb2.KVTransferMessage(begin=begin))
        grant = await _expect(self.call.read(), GRANT)
        self._answer = asyncio.ensure_future(self.call.read())
        return tuple(grant.block_ids)

    @property
    def stopped(self) -> bool:
        """The receiver answered before done: it said stop (or the call ended)."""
        return self._answer is not None and self._answer.done()

    async def send(self, msg: worker_pb2.KVTransferMessage) -> None:
        """One slab's message (chunk or written_slab)."""
        await self._write(msg)

    async def finish(self, first_token_id: int, first_logprob: Logprob | None) -> None:
        """done (unless stopped), end of our stream, the receiver's complete."""
        if not self.stopped:
            done = wire.done_to_proto(first_token_id, first_logprob)
            await self._write(worker_pb2.KVTransferMessage(done=done))
        await self.call.done_writing()
        await _expect(self._answer, COMPLETE)

    async def _write(self, msg: worker_pb2.KVTransferMessage) -> None:
        msg.handoff_id = self.dest.handoff_id
        try:
            await self.call.write(msg)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as e:
            answer = self._answer  # the receiver may have ended the call: its answer says why
            if answer is not None and answer.done() and not answer.cancelled():
                await _expect(answer, COMPLETE)
            if isinstance(e, grpc.aio.AioRpcError):
                raise
            raise HandoffRefused("the decode server ended the KV transfer") from None


async def _expect(read, want: int) -> worker_pb2.KVTransferReply:
    """The receiver's answer (a pending call.read()) must be `want`; that answer."""
    reply = await read
    if reply is grpc.aio.EOF:
        raise HandoffRefused("the decode server ended the KV transfer without an answer")
    if reply.reply == STOP:
        raise HandoffRefused(f"decode server refused the KV: {reply.error}")
    if reply.reply != want:
        raise HandoffRefused(f"unexpected answer {worker_pb2.KVReply.Name(reply.reply)}")
    return reply
