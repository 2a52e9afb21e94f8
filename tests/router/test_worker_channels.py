"""Router -> worker channels: a static worker that restarts on the same address is reached
again within the channel's short reconnect backoff, not gRPC's default (which grows past 4 s
after a few seconds of failures, all the while the router would count the worker as down)."""

import asyncio

import grpc
import pytest
from router_fakes import FakeDecode, FakeState

from protos import worker_pb2, worker_pb2_grpc
from router.workers import Role, WorkerPool

DOWN_S = 20.0  # gRPC's default backoff (1 s x 1.6 per failure) has then grown to ~6-10 s
REACHED_WITHIN_S = 2.5  # the router's backoff is capped at 1 s


async def _serve(port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    worker_pb2_grpc.add_DecodeServicer_to_server(FakeDecode(FakeState(script=[5, 2])), server)
    await server.start()
    return server, bound


async def _stats(stub, timeout: float) -> bool:
    try:
        await stub.Stats(worker_pb2.StatsRequest(), timeout=timeout)
        return True
    except grpc.aio.AioRpcError:
        return False


@pytest.mark.slow
def test_restarted_static_worker_is_reached_within_the_backoff():
    async def run():
        loop = asyncio.get_running_loop()
        server, port = await _serve(0)
        pool = WorkerPool()
        w = pool.add(Role.DECODE, f"127.0.0.1:{port}", static=True)
        try:
            assert await _stats(w.stub, timeout=5)
            await server.stop(0)
            end = loop.time() + DOWN_S
            while loop.time() < end:  # the router keeps trying, as its Stats poller does
                assert not await _stats(w.stub, timeout=0.3)
                await asyncio.sleep(0.2)
            server, again = await _serve(port)
            assert again == port
            t0 = loop.time()
            # wait_for_ready: the call waits for the channel's own next reconnect attempt
            await w.stub.Stats(
                worker_pb2.StatsRequest(), timeout=REACHED_WITHIN_S, wait_for_ready=True
            )
            return loop.time() - t0
        finally:
            await w.channel.close()
            await server.stop(0)

    took = asyncio.run(run())
    assert took < REACHED_WITHIN_S
