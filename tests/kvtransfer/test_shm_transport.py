"""The KV transports on their own: a decode-side pool in a /dev/shm file behind the real
KVTransfer.Transfer servicer (grpc.aio on 127.0.0.1), written by the real senders (shm: in
this process, a second mapping of the file, and from a child process; grpc: chunks the
receiver stores). The pool is poisoned first, so an element the sender should have written
and did not still holds the poison."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

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
    ShmPoolFile,
    export_cuda_pool,
    gpu_uuid,
    host_id,
    map_shm_pool,
    sweep_stale_pool_files,
)
from kvtransfer.receiver import KVTransferServicer
from kvtransfer.registry import RECEIVERS, SENDERS
from protos import worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
POISON = -7777.0
# [layers, 2, blocks, block_size, kv_heads, head_dim]: small, yet several slabs and blocks
LAYERS, BLOCK_SIZE, HEADS, DIM = 5, 4, 2, 3
DECODE_BLOCKS, PREFILL_BLOCKS = 12, 9
# the handoff: decode blocks [3, 7, 2, 9, 11]; block 3 already cached there (first_block 1),
# so prefill blocks [5, 1, 6, 0] go to decode blocks [7, 2, 9, 11]
DEST_BLOCKS, FIRST_BLOCK, SRC_BLOCKS = (3, 7, 2, 9, 11), 1, [5, 1, 6, 0]


def _shape(num_blocks: int) -> tuple[int, ...]:
    return (LAYERS, 2, num_blocks, BLOCK_SIZE, HEADS, DIM)


def _source(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(_shape(PREFILL_BLOCKS), generator=g).to(dtype)


@pytest.fixture
def shm_dir():
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="tandem-test-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Receiver:
    """A decode server's KV side: ledger, poisoned pool (a shm file, or CUDA memory exported
    through CUDA IPC), KVTransfer on 127.0.0.1."""

    def __init__(self, directory: str, dtype: torch.dtype, device: str = "cpu") -> None:
        self.file = None
        if device == "cpu":
            self.file = ShmPoolFile(directory)
            self.pool = map_shm_pool(self.file.path, _shape(DECODE_BLOCKS), dtype)
            self.pool.fill_(POISON)
            self.export = self.file.export(self.pool)
            self.transport = "shm"
        else:
            self.pool = torch.full(_shape(DECODE_BLOCKS), POISON, dtype=dtype, device=device)
            self.export = export_cuda_pool(self.pool)
            self.transport = "cuda_ipc"
        self.ledger = HandoffLedger(lease_s=30, stall_s=10)
        self.directory = directory

    def open(self, handoff_id: str):
        """The handoff the tests push: DEST_BLOCKS reserved, the first FIRST_BLOCK of them
        the decode side's cached prefix."""
        return self.ledger.open(handoff_id, "r", list(DEST_BLOCKS), FIRST_BLOCK * BLOCK_SIZE)

    @contextlib.asynccontextmanager
    async def serving(self):
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        port = server.add_insecure_port("127.0.0.1:0")
        kv = DecodeKV(self.pool, tuple(self.pool.shape), export=self.export)
        receivers = {name: RECEIVERS[name](kv) for name in (self.transport, "grpc")}
        servicer = KVTransferServicer(self.ledger, receivers)
        worker_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
        await server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await server.stop(None)
            if self.file is not None:
                self.file.close()


def _assert_written_exactly(pool: torch.Tensor, src: torch.Tensor) -> None:
    """Reserved blocks from FIRST_BLOCK hold src's blocks bit for bit; every other element
    of the pool still holds the poison."""
    expected = torch.full_like(pool, POISON)
    for s, d in zip(SRC_BLOCKS, DEST_BLOCKS[FIRST_BLOCK:], strict=True):
        expected[:, :, d] = src[:, :, s]
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))


async def _noop() -> None:
    return None


def _dest(handoff_id: str, address: str, rx: Receiver, blocks=DEST_BLOCKS) -> KVDest:
    """The KVTarget the decode side issued for the handoff (a made-up capability for one it
    does not have)."""
    h = rx.ledger.handoffs.get(handoff_id)
    capability = h.capability if h is not None else bytes(32)
    transports = (rx.transport, "grpc")
    return KVDest(handoff_id, address, blocks, FIRST_BLOCK, "r", transports, rx.export, capability)


def _sender(transport: str, timeout_s: float = 10, shm_dir: str = "", **kwargs):
    if transport == "shm":  # pool files are opened from this directory only
        kwargs["shm_dir"] = shm_dir
    return SENDERS[transport](Channels(timeout_s), Endpoint(host_id(), ""), **kwargs)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sender_writes_exactly_the_reserved_blocks(shm_dir, dtype, transport):
    rx = Receiver(shm_dir, dtype)
    src = _source(dtype)

    async def main():
        async with rx.serving() as address:
            h = rx.open("h#0")
            waiter = asyncio.create_task(rx.ledger.wait(h))
            # one layer per slab: the lockstep runs over LAYERS slabs
            per_layer = 2 * len(SRC_BLOCKS) * BLOCK_SIZE * HEADS * DIM * src.element_size()
            kwargs = {"slab_bytes": per_layer} if transport == "shm" else {}
            sender = _sender(transport, shm_dir=shm_dir, **kwargs)
            await sender.send(_dest("h#0", address, rx), KVSource(src, SRC_BLOCKS, _noop), 42, None)
            done = await waiter
            open_pools = getattr(sender, "num_open_pools", 1)
            await sender.close()
            await sender.channels.close()
            return done, open_pools

    done, open_pools = asyncio.run(main())
    assert (done.state, done.first_token_id) == (HandoffState.COMPLETE, 42)
    assert open_pools == 1
    assert rx.ledger.num_completed == {transport: 1}
    _assert_written_exactly(rx.pool, src)


SENDER_CHILD = """
import asyncio, json, sys
import torch
sys.path.insert(0, sys.argv[2])
from google.protobuf import json_format
from kvtransfer.base import Endpoint, KVDest, KVSource
from kvtransfer.channel import Channels
from kvtransfer.pool import gpu_uuid, host_id
from kvtransfer.registry import SENDERS
from kvtransfer.wire import pool_from_proto
from protos import worker_pb2

a = json.loads(sys.argv[1])
export = pool_from_proto(json_format.Parse(a["pool"], worker_pb2.KVPoolExport()))
g = torch.Generator().manual_seed(a["seed"])
device = torch.device(a["device"])
src = torch.randn(a["src_shape"], generator=g).to(export.dtype).to(device)

async def noop():
    return None

async def main():
    here = Endpoint(host_id(), gpu_uuid(device))
    kwargs = {"shm_dir": a["shm_dir"]} if export.transport == "shm" else {}
    sender = SENDERS[export.transport](Channels(20), here, **kwargs)
    dest = KVDest(
        a["handoff_id"], a["address"], tuple(a["dest"]), a["first_block"], "r",
        (export.transport,), export, bytes.fromhex(a["capability"]),
    )
    await sender.send(dest, KVSource(src, a["src_blocks"], noop), 7, None)
    await sender.close()
    await sender.channels.close()

asyncio.run(main())
print("sent")
"""


def _child_writes(directory: str, device: str, dtype: torch.dtype) -> None:
    """A child process, the real sender, writes one handoff into this process's pool."""
    from google.protobuf import json_format

    from kvtransfer.wire import pool_to_proto

    rx = Receiver(directory, dtype, device)

    async def main():
        async with rx.serving() as address:
            h = rx.open("child#0")
            args = {
                "pool": json_format.MessageToJson(pool_to_proto(rx.export)),
                "seed": 3,
                "src_shape": list(_shape(PREFILL_BLOCKS)),
                "handoff_id": "child#0",
                "address": address,
                "dest": list(DEST_BLOCKS),
                "first_block": FIRST_BLOCK,
                "src_blocks": SRC_BLOCKS,
                "device": device,
                "shm_dir": directory,
                "capability": h.capability.hex(),
            }
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SENDER_CHILD, json.dumps(args), str(ROOT),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await child.communicate()
            assert child.returncode == 0, err.decode()
            assert out.decode().strip() == "sent"
            return await rx.ledger.wait(h)

    done = asyncio.run(main())
    assert (done.state, done.first_token_id) == (HandoffState.COMPLETE, 7)
    assert rx.ledger.num_completed == {rx.transport: 1}
    _assert_written_exactly(rx.pool.cpu(), _source(dtype, seed=3))


def test_a_child_process_writes_through_the_pool_file(shm_dir):
    _child_writes(shm_dir, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_child_process_writes_through_cuda_ipc(shm_dir):
    """cuda_ipc: the same handoff into a CUDA pool opened through its IPC handle."""
    assert gpu_uuid(torch.device("cuda", 0))
    _child_writes(shm_dir, "cuda", torch.bfloat16)


async def _open_transfer(address: str, handoff_id: str):
    channel = grpc.aio.insecure_channel(address)
    stub = worker_pb2_grpc.KVTransferStub(channel)
    return channel, stub.Transfer(metadata=((HANDOFF_ID_KEY, handoff_id),))


def _begin(
    handoff_id: str,
    pool_id: str,
    num_slabs: int = 2,
    transport: str = "shm",
    capability: bytes = b"",
) -> worker_pb2.KVTransferMessage:
    begin = worker_pb2.KVBegin(
        transport=transport, pool_id=pool_id, num_slabs=num_slabs, capability=capability
    )
    return worker_pb2.KVTransferMessage(handoff_id=handoff_id, begin=begin)


GRANT, STOP = worker_pb2.KV_REPLY_GRANT, worker_pb2.KV_REPLY_STOP


def test_reclaim_stops_the_sender_and_waits_for_its_stream_to_end(shm_dir):
    """The receiver's side of the protocol, driven by hand: a handoff reclaimed while the
    writes are granted tells the sender to stop at once, but cannot settle (its blocks cannot
    be freed) until the sender's stream ends: until then a slab write may still land."""
    rx = Receiver(shm_dir, torch.float32)

    async def spin():
        for _ in range(20):
            await asyncio.sleep(0)

    async def main():
        async with rx.serving() as address:
            h = rx.open("g#0")
            channel, call = await _open_transfer(address, "g#0")
            await call.write(_begin("g#0", rx.export.pool_id, 3, "shm", h.capability))
            assert (await call.read()).reply == GRANT  # every slab granted
            assert h.state == HandoffState.RECEIVING
            assert [x.handoff_id for x in rx.ledger.abort_request("r")] == ["g#0"]
            stop = await call.read()
            settle = asyncio.create_task(rx.ledger.settle(h))
            await spin()
            assert not settle.done()  # a write may still be landing
            await call.write(worker_pb2.KVTransferMessage(handoff_id="g#0", written_slab=0))
            await spin()
            assert not settle.done()  # slab 1 may be on its way
            await call.done_writing()  # the sender stopped: nothing more can land
            await settle
            await channel.close()
            return h, stop

    h, stop = asyncio.run(main())
    assert stop.reply == STOP and "reclaimed" in stop.error
    assert h.state == HandoffState.RECLAIMED


def test_wrong_pool_is_refused_and_fails_the_handoff(shm_dir):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.open("p#0")
            channel, call = await _open_transfer(address, "p#0")
            await call.write(_begin("p#0", "a-previous-servers-pool", capability=h.capability))
            reply = await call.read()
            await channel.close()
            return h, reply

    h, reply = asyncio.run(main())
    assert reply.reply == STOP and "another pool" in reply.error
    assert h.state == HandoffState.FAILED


SILENT_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[3])
import grpc
from kvtransfer.channel import HANDOFF_ID_KEY
from protos import worker_pb2, worker_pb2_grpc

async def main():
    channel = grpc.aio.insecure_channel(sys.argv[1])
    stub = worker_pb2_grpc.KVTransferStub(channel)
    call = stub.Transfer(metadata=((HANDOFF_ID_KEY, "k#0"),))
    begin = worker_pb2.KVBegin(
        transport="shm", pool_id=sys.argv[2], num_slabs=3, capability=bytes.fromhex(sys.argv[4])
    )
    await call.write(worker_pb2.KVTransferMessage(handoff_id="k#0", begin=begin))
    granted = (await call.read()).reply == worker_pb2.KV_REPLY_GRANT
    print("granted" if granted else "refused", flush=True)
    await asyncio.Event().wait()  # "mid-copy" until killed

asyncio.run(main())
"""


def test_a_sender_killed_mid_copy_fails_the_handoff(shm_dir):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.open("k#0")
            waiter = asyncio.create_task(rx.ledger.wait(h))
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SILENT_CHILD, address, rx.export.pool_id, str(ROOT),
                h.capability.hex(),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert (await child.stdout.readline()).decode().strip() == "granted"
            assert not h.store.done()  # granted: a write may be in flight
            child.send_signal(signal.SIGKILL)
            await child.wait()
            with pytest.raises(HandoffFailed, match="failed: .*(ended before done|went away)"):
                await waiter
            await rx.ledger.settle(h)  # the dead sender writes nothing: settles at once
            return h

    h = asyncio.run(main())
    assert h.state == HandoffState.FAILED and h.store.done()


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_refused_sender_raises(shm_dir, transport):
    """A handoff the receiver no longer has (lease reclaimed): the real sender gets a refusal
    before writing or sending anything."""
    rx = Receiver(shm_dir, torch.float32)
    src = _source(torch.float32)

    async def main():
        async with rx.serving() as address:
            sender = _sender(transport, shm_dir=shm_dir)
            with pytest.raises(HandoffRefused, match="unknown"):
                await sender.send(
                    _dest("gone#0", address, rx), KVSource(src, SRC_BLOCKS, _noop), 1, None
                )
            await sender.close()
            await sender.channels.close()

    asyncio.run(main())
    assert bool((rx.pool == POISON).all())  # nothing written


def test_the_sender_drops_a_pool_once_its_server_is_gone(shm_dir):
    rx = Receiver(shm_dir, torch.float32)
    src = _source(torch.float32)

    async def main():
        sender = _sender("shm", shm_dir=shm_dir)
        async with rx.serving() as address:
            rx.open("d#0")
            await sender.send(_dest("d#0", address, rx), KVSource(src, SRC_BLOCKS, _noop), 1, None)
            for _ in range(20):
                await asyncio.sleep(0)
            assert sender.num_open_pools == 1  # the server is up: the pool stays open
        # the server stopped: the sender's watch sees it unreachable and lets the pool go
        for _ in range(200):
            if sender.num_open_pools == 0:
                break
            await asyncio.sleep(0.05)
        open_after = sender.num_open_pools
        await sender.channels.close()
        return open_after

    assert asyncio.run(main()) == 0


def test_a_grpc_transfer_is_stopped_at_once_when_its_handoff_ends(shm_dir):
    """grpc: the receiver stores chunks itself, so a handoff that ends mid-transfer stops the
    sender and ends the call at once, and settles at once (no store in flight)."""
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.open("s#0")
            channel, call = await _open_transfer(address, "s#0")
            await call.write(_begin("s#0", "", 2, "grpc", h.capability))
            assert (await call.read()).reply == GRANT
            rx.ledger.abort_request("r")
            stop = await call.read()
            end = await call.read()
            await asyncio.wait_for(rx.ledger.settle(h), 5)
            await channel.close()
            return h, stop, end

    h, stop, end = asyncio.run(main())
    assert stop.reply == STOP and "reclaimed" in stop.error
    assert end is grpc.aio.EOF
    assert h.state == HandoffState.RECLAIMED and h.store.done()
    assert bool((rx.pool == POISON).all())


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_done_before_every_slab_fails_the_handoff(shm_dir, transport):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.open("e#0")
            channel, call = await _open_transfer(address, "e#0")
            pool_id = rx.export.pool_id if transport == "shm" else ""
            await call.write(_begin("e#0", pool_id, 2, transport, h.capability))
            assert (await call.read()).reply == GRANT
            done = worker_pb2.KVDone(first_token_id=3)
            await call.write(worker_pb2.KVTransferMessage(handoff_id="e#0", done=done))
            reply = await call.read()
            await channel.close()
            return h, reply

    h, reply = asyncio.run(main())
    assert reply.reply == STOP and "expected slab 0 of 2" in reply.error
    assert h.state == HandoffState.FAILED


def test_a_second_transfer_for_one_handoff_is_refused_and_the_first_still_settles(shm_dir):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.open("t#0")
            channel, first = await _open_transfer(address, "t#0")
            await first.write(_begin("t#0", rx.export.pool_id, capability=h.capability))
            assert (await first.read()).reply == GRANT
            channel2, second = await _open_transfer(address, "t#0")
            await second.write(_begin("t#0", rx.export.pool_id, capability=h.capability))
            refused = await second.read()
            assert refused.reply == STOP and "already under way" in refused.error
            assert h.state == HandoffState.FAILED
            stop = await first.read()  # the handoff ended under the first sender
            await asyncio.sleep(0.05)
            assert not h.store.done()  # the first sender may still be writing
            await first.done_writing()
            await asyncio.wait_for(rx.ledger.settle(h), 5)
            await channel.close()
            await channel2.close()
            return stop

    assert asyncio.run(main()).reply == STOP


def test_a_transport_not_offered_is_refused(shm_dir):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.open("n#0")
            channel, call = await _open_transfer(address, "n#0")
            await call.write(_begin("n#0", "", transport="cuda_ipc", capability=h.capability))
            reply = await call.read()
            await channel.close()
            return h, reply

    h, reply = asyncio.run(main())
    assert reply.reply == STOP and "not offered" in reply.error
    assert h.state == HandoffState.FAILED


def test_stale_pool_files_are_swept_live_ones_kept(shm_dir):
    live = ShmPoolFile(shm_dir)
    stale = Path(shm_dir) / "tandem-kv-deadbeef"
    stale.write_bytes(b"\0" * 64)  # a killed server's file: nobody holds its lock
    assert sweep_stale_pool_files(shm_dir) == [str(stale)]
    assert Path(live.path).exists()
    live.close()
    assert not Path(live.path).exists()
