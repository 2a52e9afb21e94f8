"""The router's Registry and pool membership in process: a real router (start_router) on
127.0.0.1 driven through its Registry stub, the worker-side RegistryClient, health-driven
draining, and the drain's idle wait. No model is loaded (the router needs only a tokenizer)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protos import worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.server import start_router
from router.workers import MISSED_HEARTBEATS, Role
from rpc.procs import free_port
from tandem.loader.default_model import DEFAULT_MODEL_NAME
from worker.drain import wait_idle
from worker.registration import RegistryClient

pytestmark = pytest.mark.timeout(60)

HB_MS = 100
DECODE = worker_pb2.WORKER_ROLE_DECODE


def _info(address: str, model: str = DEFAULT_MODEL_NAME, role=DECODE) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(
        role=role, address=address, kv_address=address, model=model, block_size=16, num_blocks=64
    )


@contextlib.asynccontextmanager
async def _router(model_dir, port: int = 0, decode_addresses=()):
    config = RouterConfig(
        model=str(model_dir),
        served_model_name=DEFAULT_MODEL_NAME,
        port=port,
        heartbeat_interval_ms=HB_MS,
        stats_interval_s=0.05,
        decode_addresses=tuple(decode_addresses),
    )
    running = await start_router(config)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield running, worker_pb2_grpc.RegistryStub(channel)
    finally:
        await channel.close()
        await running.stop(None)


async def _until(predicate, timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def _membership(running) -> dict[tuple[str, str], float]:
    text = generate_latest(running.engine.metrics.registry).decode()
    return {
        (s.labels["role"], s.labels["state"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "tandem:workers"
    }


def _nowhere() -> str:
    return f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there


def test_register_checks_model_role_and_address(model_dir):
    async def main():
        async with _router(model_dir) as (running, stub):
            bad = grpc.StatusCode.INVALID_ARGUMENT
            for info, code in (
                (_info(_nowhere(), model="other-model"), grpc.StatusCode.FAILED_PRECONDITION),
                (_info(_nowhere(), model=str(model_dir)), grpc.StatusCode.FAILED_PRECONDITION),
                (_info(_nowhere(), model=""), bad),
                (_info(_nowhere(), role=0), bad),
                (_info(""), bad),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Register(info)
                assert e.value.code() == code
            assert running.engine.pool.workers == {}
            # the served name, or the --model directory's name (a worker's default)
            for model in (DEFAULT_MODEL_NAME, model_dir.name):
                resp = await stub.Register(_info(_nowhere(), model=model))
                assert resp.heartbeat_interval_ms == HB_MS
            assert len(running.engine.pool.workers) == 2

    asyncio.run(main())


def test_heartbeats_keep_a_worker_and_silence_drops_it(model_dir):
    async def main():
        async with _router(model_dir) as (running, stub):
            pool = running.engine.pool
            wid = (await stub.Register(_info(_nowhere()))).worker_id
            load = worker_pb2.WorkerLoad(worker_id=wid, num_running=3, num_free_blocks=40)
            for _ in range(2 * MISSED_HEARTBEATS):  # twice the window, heartbeating
                await asyncio.sleep(HB_MS / 1000)
                assert (await stub.Heartbeat(load)).known
            last_heartbeat = time.monotonic()
            assert wid in pool.workers
            assert pool.workers[wid].reported.num_running == 3
            assert pool.workers[wid].reported.num_free_blocks == 40
            await _until(lambda: wid not in pool.workers)
            silent = time.monotonic() - last_heartbeat
            window = MISSED_HEARTBEATS * HB_MS / 1000
            assert window <= silent <= window + HB_MS / 1000 / 2 + 0.2  # + one expiry tick
            assert not (await stub.Heartbeat(worker_pb2.WorkerLoad(worker_id=wid))).known

    asyncio.run(main())


def test_deregistered_worker_gets_no_new_work_and_leaves_when_idle(model_dir):
    async def main():
        async with _router(model_dir) as (running, stub):
            pool = running.engine.pool
            a = (await stub.Register(_info(_nowhere()))).worker_id
            b = (await stub.Register(_info(_nowhere()))).worker_id
            pool.workers[a].active = 1  # the router still streams one request from it
            await stub.Deregister(worker_pb2.DeregisterRequest(worker_id=a))
            assert pool.workers[a].draining
            assert [w.worker_id for w in pool.candidates(Role.DECODE)] == [b]
            assert all(pool.choose_decode(10).worker_id == b for _ in range(4))
            assert _membership(running)[("decode", "draining")] == 1
            for _ in range(2 * MISSED_HEARTBEATS):  # a draining worker keeps heartbeating
                assert (await stub.Heartbeat(worker_pb2.WorkerLoad(worker_id=a))).known
                assert (await stub.Heartbeat(worker_pb2.WorkerLoad(worker_id=b))).known
                await asyncio.sleep(HB_MS / 1000)
            assert a in pool.workers  # kept while its stream runs
            pool.workers[a].active = 0  # that stream ended
            await _until(lambda: a not in pool.workers, timeout=HB_MS / 1000 * 2)
            await stub.Deregister(worker_pb2.DeregisterRequest(worker_id=b))
            assert not pool.has_role(Role.DECODE)  # the router now refuses with UNAVAILABLE

    asyncio.run(main())


def test_reregistration_waits_until_the_old_entry_is_silent(model_dir):
    """A live worker keeps its address; a restart at it gets in once the old entry is
    silent past the heartbeat limit (or draining)."""

    async def main():
        async with _router(model_dir) as (running, stub):
            pool = running.engine.pool
            address = _nowhere()
            old = (await stub.Register(_info(address))).worker_id
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Register(_info(address))
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert list(pool.workers) == [old] and pool.is_live(pool.workers[old])
            # the old process died: no heartbeats; the expiry loop has not run yet
            pool.workers[old].last_seen -= 2 * pool.heartbeat_limit_s
            new = (await stub.Register(_info(address))).worker_id
            assert list(pool.workers) == [new] and new != old
            assert not (await stub.Heartbeat(worker_pb2.WorkerLoad(worker_id=old))).known
            # a draining entry (its own holder deregistered) frees the address too
            await stub.Deregister(worker_pb2.DeregisterRequest(worker_id=new))
            newest = (await stub.Register(_info(address))).worker_id
            assert list(pool.workers) == [newest]

    asyncio.run(main())


def _load() -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(num_running=2, num_free_blocks=50, num_total_blocks=64)


async def _registered_and_heartbeating(pool, address: str) -> None:
    await _until(lambda: any(w.address == address for w in pool.workers.values()))
    (w,) = pool.workers.values()
    assert w.role == Role.DECODE and w.kv_address == address
    await _until(lambda: w.reported.num_running == 2)  # a heartbeat carried _load()
    assert w.reported.num_total_blocks == 64


def test_registry_client_survives_router_down_and_restart(model_dir):
    async def main():
        port = free_port("127.0.0.1")
        address = _nowhere()
        client = RegistryClient(f"127.0.0.1:{port}", _info(address), _load)
        client.start()  # the router is not up yet: Register retries with backoff
        await asyncio.sleep(0.3)
        try:
            for _ in range(2):  # first start, then a restart that forgets every worker
                async with _router(model_dir, port) as (running, _):
                    await _registered_and_heartbeating(running.engine.pool, address)
                    assert client.interval_s == HB_MS / 1000
            assert not client.refused.is_set()
        finally:
            await client.close()

    asyncio.run(main())


def test_registry_client_drain_and_refusal(model_dir):
    async def main():
        async with _router(model_dir) as (running, _):
            router = f"127.0.0.1:{running.port}"
            pool = running.engine.pool
            client = RegistryClient(router, _info(_nowhere()), _load)
            client.start()
            await _until(lambda: client.worker_id in pool.workers)
            wid = client.worker_id
            assert await client.deregister()
            # idle, so the router drops it; the draining client must not register again
            await _until(lambda: wid not in pool.workers)
            await asyncio.sleep(MISSED_HEARTBEATS * HB_MS / 1000)
            assert pool.workers == {} and client.worker_id == ""
            await client.close()

            wrong = RegistryClient(router, _info(_nowhere(), model="other-model"), _load)
            wrong.start()
            await asyncio.wait_for(wrong.refused.wait(), 5)
            assert pool.workers == {}
            await wrong.close()

    asyncio.run(main())


def test_health_not_serving_drains_static_and_registered_workers(model_dir):
    """A worker that says NOT_SERVING gets no new work, whether or not it deregistered."""

    async def main():
        server = grpc.aio.server()
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        # two ports of one health service: a static and a registered worker can never share
        # an address
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        other = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with _router(model_dir, decode_addresses=[address]) as (running, stub):
                pool = running.engine.pool
                (static,) = pool.workers.values()
                await stub.Register(_info(other, role=worker_pb2.WORKER_ROLE_PREFILL))
                registered = next(w for w in pool.workers.values() if not w.static)
                await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                await _until(lambda: static.draining and registered.draining)
                assert not pool.has_role(Role.DECODE)
                # the registered one is drained and, idle, removed; the static one stays
                await _until(lambda: registered.worker_id not in pool.workers)
                await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
                await _until(lambda: not static.draining)  # restarted at the same address
                assert pool.choose_decode(10) is static
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_wait_idle_needs_a_quiet_period_and_respects_the_bound():
    async def main():
        busy = [2, 0, 1]  # a late request arrives after one idle poll, then idle
        polls = []

        async def poll() -> int:
            polls.append(time.monotonic())
            return busy[len(polls) - 1] if len(polls) <= len(busy) else 0

        force = asyncio.Event()
        assert await wait_idle(poll, timeout_s=5, quiet_s=0.2, force=force) == 0
        assert len(polls) > 4  # not ended by the idle poll before the late request
        assert polls[-1] - polls[3] >= 0.2  # idle for quiet_s after the last busy poll

        async def always_busy() -> int:
            return 3

        t0 = time.monotonic()
        assert await wait_idle(always_busy, timeout_s=0.3, quiet_s=0.1, force=force) == 3
        assert 0.3 <= time.monotonic() - t0 < 1.0
        force.set()  # a second SIGTERM: stop waiting at once
        t0 = time.monotonic()
        assert await wait_idle(always_busy, timeout_s=30, quiet_s=0.1, force=force) == 3
        assert time.monotonic() - t0 < 0.5

    asyncio.run(main())
