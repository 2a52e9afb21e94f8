"""The shm KV transport on its own: a decode-side pool in a /dev/shm file behind the real
KVTransfer.Write servicer (grpc.aio on 127.0.0.1), written by the real sender, in this process
(a second mapping of the file) and from a child process. The pool is poisoned first, so an
element the sender should have written and did not still holds the poison."""

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

from kvtransfer.base import HandoffState, KVDest
from kvtransfer.direct_receiver import SameHostKVTransferServicer
from kvtransfer.direct_transport import DirectKVSender
from kvtransfer.grpc_transport import (
    CHANNEL_OPTIONS,
    HANDOFF_ID_KEY,
    GrpcKVSender,
    HandoffRefused,
)
from kvtransfer.ledger import HandoffFailed, HandoffLedger
from kvtransfer.pool import (
    ShmPoolFile,
    export_cuda_pool,
    gpu_uuid,
    host_id,
    map_shm_pool,
    sweep_stale_pool_files,
)
from kvtransfer.select import Endpoint
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

    @contextlib.asynccontextmanager
    async def serving(self):
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        port = server.add_insecure_port("127.0.0.1:0")
        servicer = SameHostKVTransferServicer(
            self.ledger, self.pool, [self.transport, "grpc"], self.export
        )
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sender_writes_exactly_the_reserved_blocks(shm_dir, dtype):
    rx = Receiver(shm_dir, dtype)
    src = _source(dtype)

    async def main():
        async with rx.serving() as address:
            h = rx.ledger.open("h#0", "r", list(DEST_BLOCKS))
            waiter = asyncio.create_task(rx.ledger.wait(h))
            # 1 layer per slab: the lockstep runs over LAYERS slabs
            per_layer = 2 * len(SRC_BLOCKS) * BLOCK_SIZE * HEADS * DIM * src.element_size()
            sender = DirectKVSender(
                GrpcKVSender(timeout_s=10), Endpoint(host_id(), ""), slab_bytes=per_layer
            )
            dest = KVDest("h#0", address, DEST_BLOCKS, FIRST_BLOCK, "r")
            await sender.send(dest, rx.export, src, SRC_BLOCKS, 42, None)
            done = await waiter
            assert sender.num_open_pools == 1
            await sender.channels.close()
            return done

    done = asyncio.run(main())
    assert (done.state, done.first_token_id) == (HandoffState.COMPLETE, 42)
    assert rx.ledger.num_completed == {"shm": 1}
    _assert_written_exactly(rx.pool, src)


SENDER_CHILD = """
import asyncio, json, sys
import torch
sys.path.insert(0, sys.argv[2])
from kvtransfer.base import KVDest
from kvtransfer.direct_transport import DirectKVSender, pool_from_proto
from kvtransfer.grpc_transport import GrpcKVSender
from kvtransfer.pool import gpu_uuid, host_id
from kvtransfer.select import Endpoint
from protos import worker_pb2
from google.protobuf import json_format

a = json.loads(sys.argv[1])
export = pool_from_proto(json_format.Parse(a["pool"], worker_pb2.KVPoolExport()))
g = torch.Generator().manual_seed(a["seed"])
device = torch.device(a["device"])
src = torch.randn(a["src_shape"], generator=g).to(export.dtype).to(device)

async def main():
    here = Endpoint(host_id(), gpu_uuid(device))
    sender = DirectKVSender(GrpcKVSender(timeout_s=20), here)
    dest = KVDest(a["handoff_id"], a["address"], tuple(a["dest"]), a["first_block"], "r")
    await sender.send(dest, export, src, a["src_blocks"], 7, None)
    await sender.channels.close()

asyncio.run(main())
print("sent")
"""


def _child_writes(directory: str, device: str, dtype: torch.dtype) -> None:
    """A child process, the real sender, writes one handoff into this process's pool."""
    from google.protobuf import json_format

    from kvtransfer.direct_transport import pool_to_proto

    rx = Receiver(directory, dtype, device)

    async def main():
        async with rx.serving() as address:
            h = rx.ledger.open("child#0", "r", list(DEST_BLOCKS))
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


async def _open_write(address: str, handoff_id: str):
    channel = grpc.aio.insecure_channel(address)
    call = worker_pb2_grpc.KVTransferStub(channel).Write(metadata=((HANDOFF_ID_KEY, handoff_id),))
    return channel, call


def _begin(handoff_id: str, pool_id: str, num_slabs: int = 2) -> worker_pb2.KVWriteMessage:
    begin = worker_pb2.KVWriteBegin(transport="shm", pool_id=pool_id, num_slabs=num_slabs)
    return worker_pb2.KVWriteMessage(handoff_id=handoff_id, begin=begin)


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
            h = rx.ledger.open("g#0", "r", list(DEST_BLOCKS))
            channel, call = await _open_write(address, "g#0")
            await call.write(_begin("g#0", rx.export.pool_id, num_slabs=3))
            assert (await call.read()).ok  # every slab granted
            assert h.state == HandoffState.RECEIVING
            assert [x.handoff_id for x in rx.ledger.abort_request("r")] == ["g#0"]
            stop = await call.read()
            settle = asyncio.create_task(rx.ledger.settle(h))
            await spin()
            assert not settle.done()  # a write may still be landing
            await call.write(worker_pb2.KVWriteMessage(handoff_id="g#0", written_slab=0))
            await spin()
            assert not settle.done()  # slab 1 may be on its way
            await call.done_writing()  # the sender stopped: nothing more can land
            await settle
            await channel.close()
            return h, stop

    h, stop = asyncio.run(main())
    assert not stop.ok and "reclaimed" in stop.error
    assert h.state == HandoffState.RECLAIMED


def test_wrong_pool_is_refused_and_fails_the_handoff(shm_dir):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.ledger.open("p#0", "r", list(DEST_BLOCKS))
            channel, call = await _open_write(address, "p#0")
            await call.write(_begin("p#0", "a-previous-servers-pool"))
            reply = await call.read()
            await channel.close()
            return h, reply

    h, reply = asyncio.run(main())
    assert not reply.ok and "another pool" in reply.error
    assert h.state == HandoffState.FAILED


SILENT_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[3])
import grpc
from kvtransfer.grpc_transport import HANDOFF_ID_KEY
from protos import worker_pb2, worker_pb2_grpc

async def main():
    channel = grpc.aio.insecure_channel(sys.argv[1])
    call = worker_pb2_grpc.KVTransferStub(channel).Write(metadata=((HANDOFF_ID_KEY, "k#0"),))
    begin = worker_pb2.KVWriteBegin(transport="shm", pool_id=sys.argv[2], num_slabs=3)
    await call.write(worker_pb2.KVWriteMessage(handoff_id="k#0", begin=begin))
    print("granted" if (await call.read()).ok else "refused", flush=True)
    await asyncio.Event().wait()  # "mid-copy" until killed

asyncio.run(main())
"""


def test_a_sender_killed_mid_copy_fails_the_handoff(shm_dir):
    rx = Receiver(shm_dir, torch.float32)

    async def main():
        async with rx.serving() as address:
            h = rx.ledger.open("k#0", "r", list(DEST_BLOCKS))
            waiter = asyncio.create_task(rx.ledger.wait(h))
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SILENT_CHILD, address, rx.export.pool_id, str(ROOT),
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


def test_refused_sender_raises(shm_dir):
    """A handoff the receiver no longer has (lease reclaimed): the real sender gets a refusal
    before writing anything."""
    rx = Receiver(shm_dir, torch.float32)
    src = _source(torch.float32)

    async def main():
        async with rx.serving() as address:
            sender = DirectKVSender(GrpcKVSender(timeout_s=10), Endpoint(host_id(), ""))
            dest = KVDest("gone#0", address, DEST_BLOCKS, FIRST_BLOCK, "r")
            with pytest.raises(HandoffRefused, match="unknown"):
                await sender.send(dest, rx.export, src, SRC_BLOCKS, 1, None)
            await sender.channels.close()

    asyncio.run(main())
    assert bool((rx.pool == POISON).all())  # nothing written


def test_the_sender_drops_a_pool_once_its_server_is_gone(shm_dir):
    rx = Receiver(shm_dir, torch.float32)
    src = _source(torch.float32)

    async def main():
        sender = DirectKVSender(GrpcKVSender(timeout_s=10), Endpoint(host_id(), ""))
        async with rx.serving() as address:
            rx.ledger.open("d#0", "r", list(DEST_BLOCKS))
            dest = KVDest("d#0", address, DEST_BLOCKS, FIRST_BLOCK, "r")
            await sender.send(dest, rx.export, src, SRC_BLOCKS, 1, None)
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


def test_stale_pool_files_are_swept_live_ones_kept(shm_dir):
    live = ShmPoolFile(shm_dir)
    stale = Path(shm_dir) / "tandem-kv-deadbeef"
    stale.write_bytes(b"\0" * 64)  # a killed server's file: nobody holds its lock
    assert sweep_stale_pool_files(shm_dir) == [str(stale)]
    assert Path(live.path).exists()
    live.close()
    assert not Path(live.path).exists()
