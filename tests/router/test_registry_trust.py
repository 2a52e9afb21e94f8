"""An attacker on the internal plane against a real router (start_router on 127.0.0.1) with
static fake workers: joining the pools, draining them by guessed ids, taking over a static
address, and what the public API leaks (paths, worker addresses, huge model names)."""

import asyncio

import grpc
import pytest
from router_fakes import start_stack

from protos import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.server import start_router
from rpc.pki import cert_paths, write_certs
from rpc.procs import free_port
from rpc.tls import TLSConfig, aio_channel

pytestmark = pytest.mark.timeout(60)

DECODE, PREFILL = worker_pb2.WORKER_ROLE_DECODE, worker_pb2.WORKER_ROLE_PREFILL
SCRIPT = [300, 301]


def _nowhere() -> str:
    return f"127.0.0.1:{free_port('127.0.0.1')}"


def _info(address: str, role=DECODE, **kw) -> worker_pb2.WorkerInfo:
    fields = dict(model="tiny", block_size=4, num_blocks=64, kv_address=address) | kw
    return worker_pb2.WorkerInfo(role=role, address=address, **fields)


def _req(model: str = "") -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        model=model,
        token_ids=router_pb2.TokenIds(ids=[5, 6, 7]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=2),
    )


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def _generate(stub) -> list[int]:
    return [t async for c in stub.Generate(_req()) for t in c.token_ids]


def test_guessed_ids_neither_drain_nor_keep_workers(model_dir):
    async def main():
        stack = await start_stack(model_dir, SCRIPT)
        pool = stack.router.engine.pool
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                reg = worker_pb2_grpc.RegistryStub(ch)
                ids = {(await reg.Register(_info(_nowhere()))).worker_id for _ in range(2)}
                before = {wid: w.draining for wid, w in pool.workers.items()}
                # sequential guesses, and the static workers' real ids (as if leaked)
                guesses = [f"{r}-{i}" for r in ("prefill", "decode") for i in range(4)]
                guesses += [w.worker_id for w in pool.workers.values() if w.static]
                for wid in guesses:
                    req = worker_pb2.DeregisterRequest(worker_id=wid)
                    assert await _code(reg.Deregister(req)) == grpc.StatusCode.NOT_FOUND
                    assert not (await reg.Heartbeat(worker_pb2.WorkerLoad(worker_id=wid))).known
                after = {wid: w.draining for wid, w in pool.workers.items()}
                tokens = await _generate(router_pb2_grpc.RouterStub(ch))
            return ids, before, after, tokens
        finally:
            await stack.stop()

    ids, before, after, tokens = asyncio.run(main())
    assert len(ids) == 2 and all(len(i.split("-", 1)[1]) >= 22 for i in ids)  # 128 random bits
    assert before == after and not any(after.values())  # nothing drained, nothing dropped
    assert tokens == SCRIPT  # the static workers still serve


def test_register_cannot_take_or_shadow_a_static_address(model_dir):
    async def main():
        stack = await start_stack(model_dir, SCRIPT)
        pool = stack.router.engine.pool
        decode, prefill = stack.decodes[0].address, stack.prefills[0].address
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                reg = worker_pb2_grpc.RegistryStub(ch)
                codes = [
                    await _code(reg.Register(info))
                    for info in (
                        _info(decode),  # the static decode server's own address
                        _info(_nowhere(), kv_address=decode),  # ... as its KV address
                        _info(prefill, role=PREFILL, kv_address=""),
                        _info(decode, role=PREFILL, kv_address=""),  # other role, same place
                    )
                ]
                members = sorted((w.address, w.static, w.draining) for w in pool.workers.values())
                tokens = await _generate(router_pb2_grpc.RouterStub(ch))
            expected = sorted([(decode, True, False), (prefill, True, False)])
            return codes, members, expected, tokens, stack.decodes[0].state.requests
        finally:
            await stack.stop()

    codes, members, expected, tokens, decoded = asyncio.run(main())
    assert codes == [grpc.StatusCode.ALREADY_EXISTS] * 4
    assert members == expected  # only the static workers, both still serving
    assert tokens == SCRIPT and len(decoded) == 1  # served by the static decode server


def test_register_refuses_malformed_worker_info(model_dir):
    huge = "m" * 100_000
    bad = [
        (_info(_nowhere(), model=""), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), model=huge), grpc.StatusCode.FAILED_PRECONDITION),
        (_info(_nowhere(), role=0), grpc.StatusCode.INVALID_ARGUMENT),
        (_info("no-port"), grpc.StatusCode.INVALID_ARGUMENT),
        (_info("127.0.0.1:0"), grpc.StatusCode.INVALID_ARGUMENT),
        (_info("127.0.0.1:70000"), grpc.StatusCode.INVALID_ARGUMENT),
        (_info("bad host:80"), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), kv_address="x"), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), block_size=0), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), block_size=1 << 20), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), num_blocks=0), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), num_blocks=-5), grpc.StatusCode.INVALID_ARGUMENT),
        (_info(_nowhere(), num_blocks=1 << 30), grpc.StatusCode.INVALID_ARGUMENT),
    ]

    async def main():
        stack = await start_stack(model_dir, SCRIPT)
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                reg = worker_pb2_grpc.RegistryStub(ch)
                codes = [await _code(reg.Register(info)) for info, _ in bad]
                ok = await reg.Register(_info("[::1]:5000"))  # IPv6 is fine
            return codes, ok.worker_id, len(stack.router.engine.pool.workers)
        finally:
            await stack.stop()

    codes, ok, num_workers = asyncio.run(main())
    assert codes == [code for _, code in bad]
    assert ok and num_workers == 3  # the two static ones and the good registration


def test_certificate_role_must_match_the_registered_role(model_dir, tmp_path):
    write_certs(tmp_path)

    def tls(role: str) -> TLSConfig:
        cert, key = cert_paths(tmp_path, role)
        return TLSConfig.from_files(
            str(cert), str(key), str(tmp_path / "ca.pem"), require_client_cert=True
        )

    async def main():
        config = RouterConfig(
            model=str(model_dir), served_model_name="tiny", port=0, tls=tls("router")
        )
        running = await start_router(config)
        address = f"127.0.0.1:{running.port}"
        try:
            out = {}
            for cert_role, role in (
                ("prefill", DECODE), ("decode", PREFILL), ("gateway", DECODE),
                ("prefill", PREFILL), ("decode", DECODE),
            ):  # fmt: skip
                async with aio_channel(address, tls(cert_role), peer_role="router") as ch:
                    info = _info(_nowhere(), role=role)
                    out[cert_role, role] = await _code(
                        worker_pb2_grpc.RegistryStub(ch).Register(info)
                    )
            roles = sorted(w.role.name for w in running.engine.pool.workers.values())
            return out, roles
        finally:
            await running.stop(None)

    out, roles = asyncio.run(main())
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert out[("prefill", DECODE)] == out[("decode", PREFILL)] == denied
    assert out[("gateway", DECODE)] == denied  # not a worker at all (rpc/auth.py)
    assert out[("prefill", PREFILL)] == out[("decode", DECODE)] == grpc.StatusCode.OK
    assert roles == ["DECODE", "PREFILL"]


def test_token_mode_refuses_a_register_without_the_token(model_dir):
    async def main():
        config = RouterConfig(
            model=str(model_dir), served_model_name="tiny", port=0, tls=TLSConfig(token="s3cret")
        )
        running = await start_router(config)
        address = f"127.0.0.1:{running.port}"
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stranger = await _code(worker_pb2_grpc.RegistryStub(ch).Register(_info(_nowhere())))
            async with aio_channel(address, TLSConfig(token="s3cret")) as ch:
                worker = await _code(worker_pb2_grpc.RegistryStub(ch).Register(_info(_nowhere())))
            return stranger, worker, len(running.engine.pool.workers)
        finally:
            await running.stop(None)

    stranger, worker, num_workers = asyncio.run(main())
    assert stranger == grpc.StatusCode.UNAUTHENTICATED
    assert worker == grpc.StatusCode.OK and num_workers == 1


def test_public_responses_carry_no_path_or_worker_address(model_dir):
    async def main():
        stack = await start_stack(model_dir, SCRIPT)
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                models = await stub.ListModels(router_pb2.ListModelsRequest())
                chunks = [c async for c in stub.Generate(_req())]
            addresses = [f.address for f in stack.prefills + stack.decodes]
            return models, chunks, addresses
        finally:
            await stack.stop()

    models, chunks, addresses = asyncio.run(main())
    (card,) = models.models
    assert card.id == card.root == "tiny"
    wire = models.SerializeToString() + b"".join(c.SerializeToString() for c in chunks)
    assert str(model_dir).encode() not in wire
    assert all(a.encode() not in wire for a in addresses) and b"127.0.0.1" not in wire
    assert chunks[-1].HasField("timing") and chunks[-1].timing.ttft_ms > 0


def test_model_names_on_grpc(model_dir):
    async def main():
        stack = await start_stack(model_dir, SCRIPT)
        try:
            async with grpc.aio.insecure_channel(stack.address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                out = {}
                for name, model in (
                    ("huge", "m" * 100_000), ("unknown", "gpt-4"), ("path", str(model_dir)),
                ):  # fmt: skip
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        [c async for c in stub.Generate(_req(model))]
                    md = dict(e.value.trailing_metadata())
                    out[name] = (e.value.code(), md.get("param"), len(e.value.details()))
                tokenize = await _code(
                    stub.Tokenize(router_pb2.TokenizeRequest(model="m" * 100_000, text="hi"))
                )
                default = [t async for c in stub.Generate(_req("")) for t in c.token_ids]
                named = [t async for c in stub.Generate(_req("tiny")) for t in c.token_ids]
            return out, tokenize, default, named
        finally:
            await stack.stop()

    out, tokenize, default, named = asyncio.run(main())
    assert out["huge"][:2] == (grpc.StatusCode.INVALID_ARGUMENT, "model")
    assert out["huge"][2] < 200  # the name is not echoed back
    assert out["unknown"][:2] == out["path"][:2] == (grpc.StatusCode.NOT_FOUND, "model")
    assert tokenize == grpc.StatusCode.INVALID_ARGUMENT
    assert default == named == SCRIPT  # "" (proto3's unset) is the served model
