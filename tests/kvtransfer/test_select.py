"""Which KV transport a handoff takes: the decode server's offer against the sender's place,
and how the prefill server's senders pick and read per handoff."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransfer.base import Endpoint, KVDest
from kvtransfer.pool import PoolExport, host_id
from kvtransfer.select import KVSenders, choose_transport, offered_transports, reachable

HOST, OTHER_HOST = "boot-a/ipc:[1]", "boot-b/ipc:[1]"
GPU0, GPU1 = "GPU-0000", "GPU-1111"
SHAPE = (2, 2, 8, 16, 1, 4)


def _pool(transport: str, host: str = HOST, gpu: str = "") -> PoolExport:
    return PoolExport(transport, "pool-1", host, SHAPE, torch.float32, gpu_uuid=gpu)


CPU_HERE = Endpoint(HOST, "")
GPU0_HERE = Endpoint(HOST, GPU0)


@pytest.mark.parametrize(
    ("flag", "device", "want"),
    [
        ("auto", "cpu", ["shm", "grpc"]),
        ("auto", "cuda", ["cuda_ipc", "grpc"]),
        ("grpc", "cuda", ["grpc"]),
        ("shm", "cpu", ["shm"]),
        ("cuda_ipc", "cuda", ["cuda_ipc"]),
    ],
)
def test_decode_offers(flag, device, want):
    assert offered_transports(flag, device) == want


@pytest.mark.parametrize(("flag", "device"), [("auto", "cuda"), ("auto", "cpu"), ("grpc", "cuda")])
def test_tensor_parallel_workers_use_grpc_only(flag, device):
    """Each rank's pool holds only its KV heads: no same-host pool to export or write."""
    assert offered_transports(flag, device, tensor_parallel_size=2) == ["grpc"]


@pytest.mark.parametrize(("flag", "device"), [("cuda_ipc", "cuda"), ("shm", "cpu")])
def test_tensor_parallel_refuses_a_forced_same_host_transport(flag, device):
    with pytest.raises(ValueError, match="needs --tensor-parallel-size 1"):
        offered_transports(flag, device, tensor_parallel_size=2)


@pytest.mark.parametrize(
    ("flag", "device"), [("shm", "cuda"), ("cuda_ipc", "cpu"), ("nccl", "cuda")]
)
def test_decode_refuses_a_forced_transport_its_pool_cannot_serve(flag, device):
    with pytest.raises(ValueError, match="kv-transport"):
        offered_transports(flag, device)


@pytest.mark.parametrize(
    ("here", "offered", "pool", "want"),
    [
        # same GPU of the same host: CUDA IPC
        (GPU0_HERE, ["cuda_ipc", "grpc"], _pool("cuda_ipc", gpu=GPU0), "cuda_ipc"),
        # another GPU of the same host: not CUDA IPC (nccl's place, not built): grpc
        (GPU0_HERE, ["cuda_ipc", "grpc"], _pool("cuda_ipc", gpu=GPU1), "grpc"),
        # same GPU UUID string but another host: grpc
        (Endpoint(OTHER_HOST, GPU0), ["cuda_ipc", "grpc"], _pool("cuda_ipc", gpu=GPU0), "grpc"),
        # both on CPU, same host: shm
        (CPU_HERE, ["shm", "grpc"], _pool("shm"), "shm"),
        # CPU decode, GPU prefill on the same host: grpc
        (GPU0_HERE, ["shm", "grpc"], _pool("shm"), "grpc"),
        # CPU, another host: grpc
        (Endpoint(OTHER_HOST, ""), ["shm", "grpc"], _pool("shm"), "grpc"),
        # an older decode server: only grpc, no pool
        (CPU_HERE, [], None, "grpc"),
        # offered shm but no pool to open: grpc
        (CPU_HERE, ["shm", "grpc"], None, "grpc"),
    ],
)
def test_auto_picks_the_best_reachable(here, offered, pool, want):
    assert choose_transport("auto", here, offered, pool) == want


def test_forced_transport_is_used_or_refused_with_the_reason():
    assert choose_transport("grpc", CPU_HERE, ["shm", "grpc"], _pool("shm")) == "grpc"
    assert choose_transport("shm", CPU_HERE, ["shm", "grpc"], _pool("shm")) == "shm"
    with pytest.raises(ValueError, match="offers grpc"):
        choose_transport("shm", CPU_HERE, ["grpc"], None)
    with pytest.raises(ValueError, match="another host"):
        choose_transport("shm", Endpoint(OTHER_HOST, ""), ["shm"], _pool("shm"))
    with pytest.raises(ValueError, match="another GPU"):
        choose_transport("cuda_ipc", GPU0_HERE, ["cuda_ipc"], _pool("cuda_ipc", gpu=GPU1))


def test_decode_forced_to_shm_leaves_a_remote_sender_no_transport():
    with pytest.raises(ValueError, match="no usable KV transport"):
        choose_transport("auto", Endpoint(OTHER_HOST, ""), ["shm"], _pool("shm"))


def test_reachable_explains_why_not():
    assert reachable("grpc", CPU_HERE, None) == ""
    assert "exports no shm pool" in reachable("shm", CPU_HERE, _pool("cuda_ipc", gpu=GPU0))


def test_host_id_is_this_kernel_and_ipc_namespace():
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    hid = host_id()
    assert hid.startswith(boot + "/ipc:[") and hid == host_id()


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_worker_refuses_to_start_with_a_transport_its_device_cannot_serve(role):
    import argparse

    from rpc.tls import PLAINTEXT

    if role == "prefill":
        from prefill_service.server import add_cli_args, run
    else:
        from decode_service.server import add_cli_args, run
    p = argparse.ArgumentParser()
    add_cli_args(p)
    args = p.parse_args(["--device", "cpu", "--kv-transport", "cuda_ipc"])
    with pytest.raises(SystemExit, match=f"tandem {role}: .*cuda_ipc needs .*CUDA device"):
        run(args, PLAINTEXT)  # before any model is loaded


def test_pool_export_round_trips_through_protobuf():
    """Every CUDA IPC field travels as itself (bytes, integers, a bool), in torch's order."""
    from kvtransfer.pool import CudaIpcFields
    from kvtransfer.wire import pool_from_proto, pool_to_proto

    cuda = CudaIpcFields(b"\x01" * 64, 4096, 512, b"/torch_123_456", 7, b"\x02" * 64, True)
    export = PoolExport("cuda_ipc", "p", HOST, SHAPE, torch.bfloat16, gpu_uuid=GPU0, cuda=cuda)
    msg = pool_to_proto(export)
    assert msg.cuda.ref_counter_offset == 7 and msg.cuda.event_sync_required
    assert pool_from_proto(msg) == export
    shm = PoolExport("shm", "q", HOST, SHAPE, torch.float32, shm_path="/dev/shm/tandem-kv-q")
    assert pool_from_proto(pool_to_proto(shm)) == shm


def _dest(transports, pool=None) -> KVDest:
    return KVDest("h#0", "127.0.0.1:1", (0, 1), 0, "r", tuple(transports), pool)


def test_senders_pick_grpc_only_at_tensor_parallel_size_above_one():
    senders = KVSenders(torch.zeros(SHAPE), tensor_parallel_size=2)
    here_pool = PoolExport("shm", "p", host_id(), SHAPE, torch.float32, "/nowhere")

    async def main():
        picked = await senders.pick(_dest(["shm", "grpc"], here_pool))
        with pytest.raises(ValueError, match="only be sent over grpc"):
            await senders.pick(_dest(["shm"], here_pool))
        await senders.close()
        return picked.name

    assert asyncio.run(main()) == "grpc"


def test_senders_fall_back_to_grpc_when_auto_cannot_open_the_pool(caplog):
    """The pool is offered and reachable on paper, but its file is not visible here."""
    missing = PoolExport("shm", "p", host_id(), SHAPE, torch.float32, "/dev/shm/tandem-kv-none")

    async def main(flag, offered):
        senders = KVSenders(torch.zeros(SHAPE), flag)
        try:
            return [(await senders.pick(_dest(offered, missing))).name for _ in range(2)]
        finally:
            await senders.close()

    assert asyncio.run(main("auto", ["shm", "grpc"])) == ["grpc", "grpc"]
    assert caplog.text.count("event=kv_pool_unopenable") == 1  # once per pool
    with pytest.raises(ValueError, match="cannot open the decode server's shm pool"):
        asyncio.run(main("shm", ["shm", "grpc"]))
    with pytest.raises(ValueError, match="cannot open the decode server's shm pool"):
        asyncio.run(main("auto", ["shm"]))


def test_senders_read_held_blocks_or_a_copy_as_the_transport_needs():
    """shm reads the engine's held blocks (released after the push); grpc a copy (the
    engine released the blocks already)."""
    cache = torch.arange(2 * 2 * 8 * 16 * 1 * 4, dtype=torch.float32).view(SHAPE)
    calls = []

    class Engine:
        async def held_block_ids(self, req_id, first_block=0):
            calls.append(("held", req_id, first_block))
            return [5, 2, 7][first_block:]

        async def copy_kv_and_release(self, req_id, first_block=0):
            calls.append(("copy", req_id, first_block))
            return cache[:, :, [2, 7]].clone()

        async def release(self, req_id):
            calls.append(("release", req_id))

    async def main():
        senders = KVSenders(cache)
        held = await senders.read(senders.senders["shm"], Engine(), "r", 1)
        copy = await senders.read(senders.senders["grpc"], Engine(), "r", 1)
        await held.release()
        await copy.release()
        await senders.close()
        return held, copy

    held, copy = asyncio.run(main())
    assert held.cache is cache and held.block_ids == [2, 7]
    assert copy.block_ids == [0, 1] and torch.equal(copy.cache, cache[:, :, [2, 7]])
    assert calls == [("held", "r", 1), ("copy", "r", 1), ("release", "r")]


def test_kv_chunks_round_trip_through_protobuf():
    from kvtransfer.wire import chunk_from_proto, chunk_to_proto

    t = torch.randn(2, 2, 3, 16, 1, 4).to(torch.bfloat16)
    msg = chunk_to_proto(0, 2, 5, t)
    assert (msg.dtype, list(msg.shape), msg.block_offset, msg.num_blocks) == (
        "bfloat16", [2, 2, 3, 16, 1, 4], 5, 3,
    )  # fmt: skip
    assert torch.equal(chunk_from_proto(msg).view(torch.uint8), t.view(torch.uint8))
    msg.data = msg.data[:-2]
    with pytest.raises(ValueError, match="is not"):
        chunk_from_proto(msg)
