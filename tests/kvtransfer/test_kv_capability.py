"""The handoff capability, played by an attacker against the real KVTransfer servicer
(grpc.aio on 127.0.0.1) over a decode pool in a /dev/shm pool file, and the real senders.

Every pool element starts as a known value (the "prefix" block holds the decode server's
cached prefix, every other block the poison), so a byte an attacker managed to write shows
up in a byte-for-byte comparison with the pool as it was."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile

import grpc
import pytest
import torch

from kvtransfer.base import (
    DecodeKV,
    Endpoint,
    HandoffFailed,
    HandoffRefused,
    HandoffState,
    KVDest,
    KVSource,
)
from kvtransfer.channel import CHANNEL_OPTIONS, HANDOFF_ID_KEY, Channels
from kvtransfer.ledger import HandoffLedger
from kvtransfer.pool import (
    SHM_PREFIX,
    PoolExport,
    ShmPoolFile,
    host_id,
    map_shm_pool,
    open_shm_pool,
)
from kvtransfer.receiver import KVTransferServicer
from kvtransfer.registry import RECEIVERS, SENDERS
from kvtransfer.wire import chunk_to_proto, dest_from_proto, pool_to_proto
from protos import worker_pb2, worker_pb2_grpc

POISON, PREFIX = -7777.0, 4242.0
LAYERS, BLOCK_SIZE, HEADS, DIM = 3, 4, 2, 3
DECODE_BLOCKS, PREFILL_BLOCKS = 10, 6
# decode blocks [3, 7, 2, 9]: block 3 is the cached prefix (shared with other requests)
DEST_BLOCKS, FIRST_BLOCK, SRC_BLOCKS = (3, 7, 2, 9), 1, [5, 1, 4]
GRANT, STOP = worker_pb2.KV_REPLY_GRANT, worker_pb2.KV_REPLY_STOP


def _shape(num_blocks: int) -> tuple[int, ...]:
    return (LAYERS, 2, num_blocks, BLOCK_SIZE, HEADS, DIM)


def _source(seed: int = 0) -> torch.Tensor:
    return torch.randn(_shape(PREFILL_BLOCKS), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def shm_dir():
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="tandem-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Decode:
    """A decode server's KV side: ledger, pool file (prefix block filled), KVTransfer."""

    def __init__(self, directory: str) -> None:
        self.file = ShmPoolFile(directory)
        self.pool = map_shm_pool(self.file.path, _shape(DECODE_BLOCKS), torch.float32)
        self.pool.fill_(POISON)
        self.pool[:, :, DEST_BLOCKS[0]] = PREFIX
        self.export = self.file.export(self.pool)
        self.ledger = HandoffLedger(lease_s=30, stall_s=5)

    def open(self, handoff_id: str):
        return self.ledger.open(handoff_id, "r", list(DEST_BLOCKS), FIRST_BLOCK * BLOCK_SIZE)

    def snapshot(self) -> bytes:
        return bytes(self.pool.view(torch.uint8).numpy())

    @contextlib.asynccontextmanager
    async def serving(self):
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        port = server.add_insecure_port("127.0.0.1:0")
        kv = DecodeKV(self.pool, tuple(self.pool.shape), export=self.export)
        servicer = KVTransferServicer(self.ledger, {n: RECEIVERS[n](kv) for n in ("shm", "grpc")})
        worker_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
        await server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await server.stop(None)
            self.file.close()


def _expected(pool_before: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    want = pool_before.clone()
    for s, d in zip(SRC_BLOCKS, DEST_BLOCKS[FIRST_BLOCK:], strict=True):
        want[:, :, d] = src[:, :, s]
    return want


async def _noop() -> None:
    return None


def _dest(rx: Decode, address: str, handoff_id: str, blocks=DEST_BLOCKS, capability=None):
    cap = rx.ledger.handoffs[handoff_id].capability if capability is None else capability
    return KVDest(handoff_id, address, blocks, FIRST_BLOCK, "r", ("shm", "grpc"), rx.export, cap)


def _sender(transport: str, shm_dir: str):
    kwargs = {"shm_dir": shm_dir} if transport == "shm" else {}
    return SENDERS[transport](Channels(10), Endpoint(host_id(), ""), **kwargs)


async def _push(rx: Decode, address: str, transport: str, shm_dir: str, dest=None, seed=0):
    sender = _sender(transport, shm_dir)
    try:
        await sender.send(dest or _dest(rx, address, "h#0"), _src(seed), 11, None)
    finally:
        await sender.close()
        await sender.channels.close()


def _src(seed: int = 0) -> KVSource:
    return KVSource(_source(seed), SRC_BLOCKS, _noop)


def _begin(handoff_id: str, transport: str, capability: bytes, num_slabs: int = 1, pool=""):
    begin = worker_pb2.KVBegin(
        transport=transport, pool_id=pool, num_slabs=num_slabs, capability=capability
    )
    return worker_pb2.KVTransferMessage(handoff_id=handoff_id, begin=begin)


async def _call(address: str, handoff_id: str):
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = worker_pb2_grpc.KVTransferStub(channel)
    return channel, stub.Transfer(metadata=((HANDOFF_ID_KEY, handoff_id),))


# -- (a) a stranger's Transfer: refused, changes nothing, the holder's push still lands ----
@pytest.mark.parametrize("transport", ["grpc", "shm"])
@pytest.mark.parametrize("capability", [b"", b"\0" * 32, b"guess"])
def test_a_transfer_without_the_capability_changes_nothing(shm_dir, transport, capability):
    rx = Decode(shm_dir)
    before = rx.pool.clone()
    garbage = chunk_to_proto(0, LAYERS, FIRST_BLOCK, torch.full(_shape(1), 1e30))

    async def main():
        async with rx.serving() as address:
            h = rx.open("h#0")
            deadline = h.deadline
            waiter = asyncio.create_task(rx.ledger.wait(h))
            pool_id = rx.export.pool_id if transport == "shm" else ""
            # 1. begin with a missing or wrong capability, then a chunk and done anyway
            channel, call = await _call(address, "h#0")
            await call.write(_begin("h#0", transport, capability, pool=pool_id))
            reply = await call.read()
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(worker_pb2.KVTransferMessage(handoff_id="h#0", chunk=garbage))
                await call.done_writing()  # (the receiver ended the call: this write fails)
            # 2. a stranger that opens a call and cancels it (must not cancel the handoff)
            _, cancelled = await _call(address, "h#0")
            await cancelled.write(_begin("h#0", transport, capability, pool=pool_id))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            # 3. a stranger's done, no begin at all
            _, done_only = await _call(address, "h#0")
            done = worker_pb2.KVDone(first_token_id=666)
            await done_only.write(worker_pb2.KVTransferMessage(handoff_id="h#0", done=done))
            refused = await done_only.read()
            await asyncio.sleep(0.05)
            untouched = (h.state, h.store, h.deadline == deadline, waiter.done())
            # 4. the holder's push goes through
            await _push(rx, address, transport, shm_dir, seed=1)
            await channel.close()
            return reply, refused, untouched, await waiter

    reply, refused, untouched, done = asyncio.run(main())
    assert reply.reply == STOP and "capability does not match" in reply.error
    assert refused.reply == STOP and "must start with begin" in refused.error
    assert untouched == (HandoffState.RESERVED, None, True, False)
    assert (done.state, done.first_token_id) == (HandoffState.COMPLETE, 11)
    assert torch.equal(rx.pool.view(torch.uint8), _expected(before, _source(1)).view(torch.uint8))
    assert rx.ledger.num_active == 0


def test_an_unknown_handoff_and_another_handoffs_capability_are_refused(shm_dir):
    """The capability is per handoff: one handoff's cannot open another."""
    rx = Decode(shm_dir)

    async def main():
        async with rx.serving() as address:
            mine, other = rx.open("mine#0"), rx.open("other#0")
            replies = []
            for hid, cap in (("other#0", mine.capability), ("nobody#0", mine.capability)):
                channel, call = await _call(address, hid)
                await call.write(_begin(hid, "grpc", cap))
                replies.append(await call.read())
                await channel.close()
            return replies, mine.state, other.state

    replies, mine, other = asyncio.run(main())
    assert [r.reply for r in replies] == [STOP, STOP]
    assert all("unknown or KVBegin.capability does not match" in r.error for r in replies)
    assert mine == other == HandoffState.RESERVED


# -- (b) the holder's grpc chunks outside its own blocks: refused, the handoff fails -------
def _chunk(layers=(0, LAYERS), offset=FIRST_BLOCK, num_blocks=1, dtype=torch.float32, shape=None):
    data = torch.full((layers[1] - layers[0], *_shape(num_blocks)[1:]), 9.0, dtype=dtype)
    msg = chunk_to_proto(layers[0], layers[1], offset, data)
    if shape is not None:
        msg.shape[:] = shape
    return msg


BAD_CHUNKS = {
    "into the cached prefix": (_chunk(offset=0), "cached prefix"),
    "straddling the prefix": (_chunk(offset=0, num_blocks=2), "cached prefix"),
    "past the reserved blocks": (_chunk(offset=3, num_blocks=2), "outside the 4 reserved"),
    "negative offset": (_chunk(offset=-1), "cached prefix"),
    "no blocks": (_chunk(num_blocks=0), "outside the 4 reserved"),
    "layers past the pool": (_chunk(layers=(1, LAYERS + 1)), "layers"),
    "another dtype": (_chunk(dtype=torch.float16), "does not fit"),
    "another shape": (_chunk(shape=[LAYERS, 2, 1, BLOCK_SIZE, HEADS * DIM, 1]), "does not fit"),
}


@pytest.mark.parametrize("bad", list(BAD_CHUNKS))
def test_a_chunk_outside_the_handoffs_own_blocks_is_refused(shm_dir, bad):
    rx = Decode(shm_dir)
    before = rx.snapshot()
    chunk, why = BAD_CHUNKS[bad]

    async def main():
        async with rx.serving() as address:
            h = rx.open("h#0")
            channel, call = await _call(address, "h#0")
            await call.write(_begin("h#0", "grpc", h.capability, num_slabs=2))
            grant = await call.read()
            await call.write(worker_pb2.KVTransferMessage(handoff_id="h#0", chunk=chunk))
            stop = await call.read()
            await asyncio.wait_for(rx.ledger.settle(h), 5)
            with pytest.raises(HandoffFailed):
                await rx.ledger.wait(h)
            await channel.close()
            rx.ledger.close("h#0")  # what the decode request's cleanup does
            return grant, stop, h

    grant, stop, h = asyncio.run(main())
    assert grant.reply == GRANT and list(grant.block_ids) == list(DEST_BLOCKS[FIRST_BLOCK:])
    assert stop.reply == STOP and why in stop.error, stop.error
    assert h.state == HandoffState.FAILED and h.store.done()
    assert rx.snapshot() == before  # not one byte, the cached prefix block least of all
    assert rx.ledger.num_active == 0 and not rx.ledger.handoffs


# -- (c) a forged KVTarget naming other blocks, same-host transport: nothing written -------
def test_a_forged_target_with_other_blocks_writes_nothing_over_shm(shm_dir):
    rx = Decode(shm_dir)
    before = rx.snapshot()

    async def main():
        async with rx.serving() as address:
            h = rx.open("h#0")
            # the holder's capability, other blocks: the prefix block and a stranger's 0, 1
            forged = _dest(rx, address, "h#0", blocks=(3, 3, 0, 1))
            with pytest.raises(HandoffRefused, match="granted blocks .*nothing written"):
                await _push(rx, address, "shm", shm_dir, dest=forged)
            with pytest.raises(HandoffFailed):
                await rx.ledger.wait(h)
            await asyncio.wait_for(rx.ledger.settle(h), 5)
            return h

    h = asyncio.run(main())
    assert rx.snapshot() == before
    assert h.state == HandoffState.FAILED and rx.ledger.num_active == 0


# -- (d) a pool path the sender must not open: refused, the file unchanged -----------------
def _export_at(rx: Decode, path: str, pool_id: str | None = None):
    pid = pool_id if pool_id is not None else os.path.basename(path).removeprefix(SHM_PREFIX)
    return dataclasses.replace(rx.export, shm_path=path, pool_id=pid)


def _bad_paths(shm_dir: str, rx: Decode, elsewhere: str) -> dict[str, tuple[str, str]]:
    """name -> (path the export names, the file whose bytes must not change)"""
    nbytes = rx.pool.numel() * rx.pool.element_size()
    empty = os.path.join(elsewhere, "victim.db")
    open(empty, "wb").close()
    link = os.path.join(shm_dir, f"{SHM_PREFIX}5eed")
    os.symlink(empty, link)
    small = os.path.join(shm_dir, f"{SHM_PREFIX}0ff5")
    with open(small, "wb") as f:
        f.write(b"\1" * (nbytes - 4))
    unheld = os.path.join(shm_dir, f"{SHM_PREFIX}dead")  # right size, no live server's lock
    with open(unheld, "wb") as f:
        f.write(b"\2" * nbytes)
    traversal = os.path.join(shm_dir, f"{SHM_PREFIX}x", "..", os.path.basename(rx.file.path))
    return {
        "an empty file elsewhere": (empty, empty),
        "a symlink in the pool directory": (link, empty),
        "a pool file of the wrong size": (small, small),
        "a pool file no server holds": (unheld, unheld),
        "a path with ..": (traversal, rx.file.path),
    }


@pytest.mark.parametrize(
    "bad",
    [
        "an empty file elsewhere",
        "a symlink in the pool directory",
        "a pool file of the wrong size",
        "a pool file no server holds",
        "a path with ..",
    ],
)
def test_a_pool_path_the_sender_must_not_open_is_refused(shm_dir, tmp_path, bad):
    rx = Decode(shm_dir)
    path, victim = _bad_paths(shm_dir, rx, str(tmp_path))[bad]
    pool_id = None if bad != "a path with .." else rx.export.pool_id
    export = _export_at(rx, path, pool_id)
    with open(victim, "rb") as f:
        victim_bytes = f.read()

    with pytest.raises((OSError, ValueError)):
        open_shm_pool(export, shm_dir)

    async def main():
        async with rx.serving() as address:
            h = rx.open("h#0")
            dest = KVDest(
                "h#0", address, DEST_BLOCKS, FIRST_BLOCK, "r", ("shm",), export, h.capability
            )
            with pytest.raises(HandoffFailed, match="cannot open the decode server's shm pool"):
                await _push(rx, address, "shm", shm_dir, dest=dest)
            with open(victim, "rb") as f:  # (before the server removes its pool file)
                return h.state, f.read()

    state, victim_after = asyncio.run(main())
    assert state == HandoffState.RESERVED  # never began: the holder may still push
    assert victim_after == victim_bytes  # not written, grown or truncated


def test_the_live_pool_file_opens(shm_dir):
    rx = Decode(shm_dir)
    t = open_shm_pool(rx.export, shm_dir)
    t[0, 0, 0, 0, 0, 0] = 5.0
    assert rx.pool[0, 0, 0, 0, 0, 0] == 5.0  # one file, two mappings
    with pytest.raises(ValueError, match="not a tandem pool file"):
        open_shm_pool(rx.export, tempfile.gettempdir())  # only from the sender's directory
    rx.file.close()


# -- the prefill side: a KVTarget without a capability or with a bad address --------------
def _target(**fields) -> worker_pb2.KVTarget:
    base = {
        "handoff_id": "h#0",
        "decode_kv_address": "127.0.0.1:5000",
        "block_ids": [1, 2],
        "block_size": 4,
        "capability": os.urandom(32),
    }
    return worker_pb2.KVTarget(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"capability": b""}, "kv_target.capability"),
        ({"capability": b"short"}, "kv_target.capability"),
        ({"decode_kv_address": ""}, "kv_target.decode_kv_address"),
        ({"decode_kv_address": "127.0.0.1"}, "kv_target.decode_kv_address"),
        ({"decode_kv_address": "127.0.0.1:0"}, "kv_target.decode_kv_address"),
        ({"decode_kv_address": "127.0.0.1:65536"}, "kv_target.decode_kv_address"),
        ({"decode_kv_address": "unix:/tmp/kv.sock"}, "kv_target.decode_kv_address"),
        ({"decode_kv_address": "dns:///evil:80"}, "kv_target.decode_kv_address"),
        ({"block_ids": [1, -2]}, "kv_target.block_ids"),
    ],
)
def test_a_target_no_decode_server_issued_is_refused(fields, field):
    with pytest.raises(ValueError, match=field):
        dest_from_proto(_target(**fields), "r", 4)


def test_a_decode_servers_target_is_accepted():
    for address in ("127.0.0.1:5000", "decode-0.tandem:50052", "[::1]:7", "tandem_decode_1:9"):
        t = _target(decode_kv_address=address)
        t.pool.CopyFrom(pool_to_proto(_export_for_wire()))
        dest = dest_from_proto(t, "r", 4)
        assert (dest.address, dest.capability) == (address, t.capability)


def _export_for_wire():
    return PoolExport("shm", "ab", "host", _shape(2), torch.float32, "/dev/shm/tandem-kv-ab")
