"""KV handoff transports on one GPU, one device call (under 8 minutes):

    PYTHONPATH=. python bench/gpu_kv_transport.py --out $OUT/kv.json --tokenizer-from DIR

(a) bandwidth: this process is the decode side (a KV pool of Llama-3.1-8B's shape: 32 layers,
    8 kv heads, head dim 128, bf16, block size 16; the real ledger and KVTransfer servicer on
    127.0.0.1), a child process the prefill side (its own cache, the real senders). Per prompt
    length (1k, 8k tokens) and transport (cuda_ipc, grpc): the child's wall time of one
    handoff (send start -> receiver complete, control messages included), random block ids
    on both sides, the written blocks checked bit for bit against the source. Next to them, in
    the same run: a plain device-to-device copy of the same bytes (`dst.copy_(src)`) and the
    transport's gather/scatter within one process (what cuda_ipc adds is the rest).
(b) serving: `tandem serve --load-format dummy` on the dummy 8B (bench/dummy_model_dir.py),
    aggregated, and disaggregated with --kv-transport grpc and cuda_ipc; one request at a
    time, 1k and 8k-token prompts, 16 output tokens: TTFT (the prefill server's token, which
    never waits for the KV), time to the second token (waits for the handoff) and E2E.

Without CUDA, (a) runs shm on a small CPU geometry and (b) is skipped (a check of the script,
not numbers). The JSON is rewritten after every step: a run cut short keeps what it measured.
"""
# ruff: noqa: E402 (imports after the sys.path lines)

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch
from google.protobuf import json_format

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kvtransfer.base import DecodeKV, Endpoint, KVDest, KVSource
from kvtransfer.channel import CHANNEL_OPTIONS, Channels
from kvtransfer.direct_transport import SLAB_BYTES, SlabWriter, plan_layer_slabs, slab_bytes_for
from kvtransfer.ledger import HandoffLedger
from kvtransfer.pool import ShmPoolFile, export_cuda_pool, gpu_uuid, host_id, map_shm_pool
from kvtransfer.receiver import KVTransferServicer
from kvtransfer.registry import RECEIVERS, SENDERS
from kvtransfer.wire import pool_from_proto, pool_to_proto
from protos import worker_pb2, worker_pb2_grpc

SEED = 1234
POISON = -3.0


def geometry(cuda: bool) -> dict:
    if cuda:  # Llama-3.1-8B
        return dict(layers=32, kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    return dict(layers=4, kv_heads=2, head_dim=64, block_size=16, dtype="float32")


def cache_shape(g: dict, num_blocks: int) -> tuple[int, ...]:
    return (g["layers"], 2, num_blocks, g["block_size"], g["kv_heads"], g["head_dim"])


def source_cache(g: dict, num_blocks: int, device: torch.device) -> torch.Tensor:
    """The sender's cache; the receiver rebuilds the same tensor to check what it got."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    x = torch.randn(cache_shape(g, num_blocks), generator=gen, device=device)
    return x.to(getattr(torch, g["dtype"]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (a) the sender child ---------------------------------------------------------------------
async def sender_main(spec: dict) -> None:
    """Child: reads one JSON command per line, runs the handoff, answers its wall time."""
    g = spec["geometry"]
    device = torch.device(spec["device"])
    cache = source_cache(g, spec["num_blocks"], device)
    sync(device)
    export = pool_from_proto(json_format.Parse(spec["pool"], worker_pb2.KVPoolExport()))
    channels = Channels(timeout_s=120)
    here = Endpoint(host_id(), gpu_uuid(device))
    offered = (export.transport, "grpc")
    senders = {name: SENDERS[name](channels, here) for name in offered}
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        dest = KVDest(
            cmd["handoff_id"], spec["address"], tuple(cmd["dest"]), 0, "", offered, export,
            capability=bytes.fromhex(cmd["capability"]),  # the receiver's, as in a KVTarget
        )  # fmt: skip
        source = KVSource(cache, cmd["src"], release=lambda: asyncio.sleep(0))  # held blocks
        t0 = time.perf_counter()
        await senders[cmd["transport"]].send(dest, source, 1, None)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    for sender in senders.values():
        await sender.close()
    await channels.close()


# -- (a) the receiver (this process) ----------------------------------------------------------
def time_copy(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """Median seconds of dst.copy_(src) over nbytes (device to device)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def time_local_ref(src, pool, src_ids, dst_ids, reps: int = 10) -> float:
    """The torch gather/scatter (kernels/kv_block_copy.py, 128 MiB slabs) within this
    process: the CPU path, and what the GPU path ran before the Triton block copy."""
    from tandem_kernels.kv_block_copy import copy_kv_blocks_ref

    s_ids = torch.tensor(src_ids, dtype=torch.long, device=src.device)
    d_ids = torch.tensor(dst_ids, dtype=torch.long, device=pool.device)
    slabs = plan_layer_slabs(src, len(src_ids), SLAB_BYTES)
    times = []
    for _ in range(reps + 1):
        sync(src.device)
        t0 = time.perf_counter()
        for layers in slabs:
            copy_kv_blocks_ref(src, pool, s_ids, d_ids, layers.start, layers.stop)
        sync(src.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_local_scatter(src, pool, src_ids, dst_ids, reps: int = 10) -> float:
    """The transport's own copy (SlabWriter, same slabs), within this process."""
    stream = torch.cuda.Stream(src.device) if src.device.type == "cuda" else None
    writer = SlabWriter(src, pool, src_ids, dst_ids, stream)
    slabs = plan_layer_slabs(src, len(src_ids), slab_bytes_for(pool.device))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        for layers in slabs:
            writer.write(layers)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


async def bandwidth(a, device: torch.device, result: dict, save) -> None:
    cuda = device.type == "cuda"
    g = geometry(cuda)
    lengths = [int(x) for x in a.lengths.split(",")] if cuda else [256, 1024]
    max_blocks = -(-max(lengths) // g["block_size"])
    num_blocks = 2 * max_blocks + 8
    dtype = getattr(torch, g["dtype"])
    same_host = "cuda_ipc" if cuda else "shm"
    shm = None
    if cuda:
        pool = torch.zeros(cache_shape(g, num_blocks), dtype=dtype, device=device)
        export = export_cuda_pool(pool)
    else:
        shm = ShmPoolFile()
        pool = map_shm_pool(shm.path, cache_shape(g, num_blocks), dtype)
        export = shm.export(pool)
    ledger = HandoffLedger(lease_s=300, stall_s=120)
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    kv = DecodeKV(pool, tuple(pool.shape), export=export)
    receivers = {name: RECEIVERS[name](kv) for name in (same_host, "grpc")}
    worker_pb2_grpc.add_KVTransferServicer_to_server(KVTransferServicer(ledger, receivers), server)
    await server.start()
    spec = dict(
        geometry=g,
        device=str(device),
        num_blocks=num_blocks,
        address=f"127.0.0.1:{port}",
        pool=json_format.MessageToJson(pool_to_proto(export)),
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sender", json.dumps(spec),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    src = source_cache(g, num_blocks, device)  # the child's cache, to check against
    block_bytes = pool[:, :, 0].numel() * pool.element_size()
    result["bandwidth"] = {"geometry": g, "block_bytes": block_bytes, "runs": []}
    rng = random.Random(7)
    try:
        if not await child.stdout.readline():
            raise RuntimeError("the sender process did not start (its stderr is above)")
        for n_tokens in lengths:
            nb = -(-n_tokens // g["block_size"])
            nbytes = nb * block_bytes
            row = {
                "prompt_tokens": n_tokens,
                "num_blocks": nb,
                "bytes": nbytes,
                "copy_gbps": nbytes / time_copy(device, nbytes) / 1e9,
            }
            src_ids = rng.sample(range(num_blocks), nb)
            dst_ids = rng.sample(range(num_blocks), nb)
            row["local_gather_scatter_gbps"] = (
                nbytes / time_local_scatter(src, pool, src_ids, dst_ids) / 1e9
            )
            row["local_torch_ref_gbps"] = nbytes / time_local_ref(src, pool, src_ids, dst_ids) / 1e9
            for transport in (same_host, "grpc"):
                times, exact = [], True
                for trial in range(a.trials + 1):  # trial 0: warm-up (opens the pool)
                    src_ids = rng.sample(range(num_blocks), nb)
                    dst_ids = rng.sample(range(num_blocks), nb)
                    pool.fill_(POISON)
                    sync(device)
                    hid = f"{transport}-{n_tokens}-{trial}"
                    h = ledger.open(hid, hid, dst_ids)
                    cmd = dict(handoff_id=hid, transport=transport, src=src_ids, dest=dst_ids)
                    cmd["capability"] = h.capability.hex()
                    child.stdin.write((json.dumps(cmd) + "\n").encode())
                    await child.stdin.drain()
                    line = await child.stdout.readline()
                    if not line:
                        raise RuntimeError("the sender process died (its stderr is above)")
                    reply = json.loads(line)
                    await ledger.wait(h)
                    ledger.close(hid)
                    sync(device)
                    got = pool[:, :, dst_ids]
                    want = src[:, :, src_ids]
                    exact &= bool(torch.equal(got.view(torch.uint8), want.view(torch.uint8)))
                    if trial:
                        times.append(reply["seconds"])
                row[transport] = {
                    "seconds": times,
                    "median_gbps": nbytes / statistics.median(times) / 1e9,
                    "best_gbps": nbytes / min(times) / 1e9,
                    "exact": exact,
                }
                print(
                    f"BW {transport} {n_tokens} tok {nbytes / 2**20:.0f} MiB: "
                    f"{row[transport]['median_gbps']:.1f} GB/s (copy {row['copy_gbps']:.0f}, "
                    f"local slab writer {row['local_gather_scatter_gbps']:.0f}, torch ref "
                    f"{row['local_torch_ref_gbps']:.0f}) exact={exact}",
                    flush=True,
                )
            result["bandwidth"]["runs"].append(row)
            save()
    finally:
        child.stdin.close()
        await child.wait()
        await server.stop(None)
        if shm is not None:
            shm.close()


# -- (b) serving ------------------------------------------------------------------------------
def one_request(url: str, model: str, prompt_ids: list[int], max_tokens: int) -> dict:
    import httpx

    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    times = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:]).get("choices"):
                    times.append(time.perf_counter() - t0)
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} chunks")
    # the second chunk is the second token unless the stream coalesced tokens (num_chunks)
    return {
        "ttft_s": times[0],
        "second_token_s": times[1],
        "e2e_s": times[-1],
        "num_chunks": len(times),
    }


def serving(a, result: dict, save, deadline: float) -> None:
    import httpx
    from dummy_model_dir import make_dummy_model_dir
    from gpu_serving import Serve

    model_dir = make_dummy_model_dir(a.config, a.tokenizer_from, Path("/tmp/tandem-dummy-model"))
    lengths = [int(x) for x in a.lengths.split(",")]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = random.Random(11)
    result["serving"] = []
    flags = ["--max-model-len", str(max(lengths) + 64), "--max-num-seqs", "16"]
    flags += ["--max-num-batched-tokens", str(max(lengths))]
    same_host = "cuda_ipc" if torch.cuda.is_available() else "shm"  # shm: the CPU smoke run
    for mode, transport in (  # most wanted first: a tight budget drops the last
        ("disaggregated", same_host),
        ("aggregated", None),
        ("disaggregated", "grpc"),
    ):
        name = mode if transport is None else f"{mode}-{transport}"
        if time.monotonic() > deadline - a.serve_estimate_s:
            result["serving"].append({"config": name, "skipped": "time budget"})
            save()
            continue
        extra = flags + ([] if transport is None else ["--kv-transport", transport])
        t0 = time.monotonic()
        serve = Serve(model_dir, mode, a.log_dir / f"serve-{name}.log", extra)
        entry = {"config": name, "startup_s": time.monotonic() - t0, "runs": []}
        try:
            model = httpx.get(f"{serve.url}/v1/models", timeout=10).json()["data"][0]["id"]
            for n in lengths:
                # warm-up, then fresh random prompts (no prefix-cache hits)
                reqs = [
                    one_request(serve.url, model, [rng.randrange(vocab) for _ in range(n)], 16)
                    for _ in range(a.requests + 1)
                ][1:]
                run = {"prompt_tokens": n, "requests": reqs}
                for k in ("ttft_s", "second_token_s", "e2e_s"):
                    run[f"median_{k}"] = statistics.median(r[k] for r in reqs)
                entry["runs"].append(run)
                print(
                    f"SERVE {name} {n} tok: TTFT {run['median_ttft_s'] * 1e3:.0f} ms, "
                    f"2nd token {run['median_second_token_s'] * 1e3:.0f} ms, "
                    f"E2E {run['median_e2e_s'] * 1e3:.0f} ms",
                    flush=True,
                )
        except Exception as e:  # noqa: BLE001 - record it, keep the other configs
            entry["error"] = repr(e)
            print(f"SERVE {name} failed: {e!r}", flush=True)
        finally:
            serve.stop()
        result["serving"].append(entry)
        save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="JSON result path")
    ap.add_argument("--lengths", default="1024,8192", help="prompt lengths (tokens)")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--requests", type=int, default=3, help="measured requests per length")
    ap.add_argument("--no-serve", action="store_true", help="skip (b)")
    ap.add_argument("--time-budget-s", type=float, default=420.0)
    ap.add_argument("--serve-estimate-s", type=float, default=120.0, help="one config of (b)")
    ap.add_argument("--config", type=Path, default=ROOT / "tandem" / "configs" / "llama-3.1-8b")
    ap.add_argument("--tokenizer-from", type=Path, default=Path(".carry/smollm2-tokenizer"))
    ap.add_argument(
        "--serve-on-cpu", action="store_true", help="run (b) without CUDA (a smoke test of it)"
    )
    ap.add_argument("--sender", default=None, help=argparse.SUPPRESS)  # the child's spec
    a = ap.parse_args()
    if a.sender is not None:
        asyncio.run(sender_main(json.loads(a.sender)))
        return
    if a.out is None:
        ap.error("--out is required")
    deadline = time.monotonic() + a.time_budget_s
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.log_dir = a.out.parent
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    result: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "same_host_transport": "cuda_ipc" if cuda else "shm",
    }

    def save() -> None:
        a.out.write_text(json.dumps(result, indent=1))

    try:
        asyncio.run(bandwidth(a, device, result, save))
    except Exception as e:  # noqa: BLE001 - keep it in the JSON, still run (b)
        result["bandwidth_error"] = repr(e)
        print(f"BW failed: {e!r}", flush=True)
    save()
    if cuda:  # the servers of (b) need the GPU memory the pools of (a) left cached here
        torch.cuda.empty_cache()
    if a.no_serve:
        result["serving"] = "skipped (--no-serve)"
    elif not cuda and not a.serve_on_cpu:
        result["serving"] = "skipped: no CUDA device"
    else:
        serving(a, result, save, deadline)
    save()
    print("wrote", a.out, flush=True)


if __name__ == "__main__":
    main()
