"""The internal plane's authorization (rpc/auth.py) on a real grpc.aio server on 127.0.0.1:
role certificates from rpc/pki.py under mutual TLS, the development-mode token, and the
router's API key. The servicers here are minimal real ones: what is under test is who gets
through to them."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from rpc.auth import server_interceptors
from rpc.pki import ROLES, cert_paths, roles_in_pem, write_certs
from rpc.tls import PLAINTEXT, TLSConfig, add_port, aio_channel, channel


class _Calls:
    def __init__(self):
        self.count = 0


class _Decode(worker_pb2_grpc.DecodeServicer):
    def __init__(self, calls):
        self.calls = calls

    async def Stats(self, request, context):
        self.calls.count += 1
        return worker_pb2.WorkerStats(num_total_blocks=7)

    async def Session(self, request_iterator, context):
        self.calls.count += 1
        async for _ in request_iterator:
            yield worker_pb2.SessionEvents()


class _Registry(worker_pb2_grpc.RegistryServicer):
    def __init__(self, calls):
        self.calls = calls

    async def Register(self, request, context):
        self.calls.count += 1
        return worker_pb2.RegisterResponse(worker_id="w")


class _Router(router_pb2_grpc.RouterServicer):
    def __init__(self, calls):
        self.calls = calls

    async def ListModels(self, request, context):
        self.calls.count += 1
        return router_pb2.ListModelsResponse(models=[router_pb2.ModelCard(id="m")])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    write_certs(d)
    return d


def role_tls(pki, role: str, mtls: bool = True) -> TLSConfig:
    cert, key = cert_paths(pki, role)
    return TLSConfig.from_files(str(cert), str(key), str(pki / "ca.pem"), require_client_cert=mtls)


async def _serve(tls: TLSConfig, api_key: str = ""):
    calls = _Calls()
    server = grpc.aio.server(interceptors=server_interceptors(tls, api_key))
    worker_pb2_grpc.add_DecodeServicer_to_server(_Decode(calls), server)
    worker_pb2_grpc.add_RegistryServicer_to_server(_Registry(calls), server)
    router_pb2_grpc.add_RouterServicer_to_server(_Router(calls), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    return server, f"127.0.0.1:{port}", calls


async def _code(coro) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_certificates_carry_one_role_each(pki):
    for role in ROLES:
        cert, key = cert_paths(pki, role)
        assert roles_in_pem(cert.read_bytes()) == {role}
        assert key.stat().st_mode & 0o077 == 0  # private keys are the owner's only


def test_each_service_admits_only_its_roles(pki):
    async def main():
        server, address, calls = await _serve(role_tls(pki, "decode"))
        try:
            results = {}
            for role in ROLES:
                async with aio_channel(address, role_tls(pki, role), peer_role="decode") as ch:
                    results[role] = (
                        await _code(
                            worker_pb2_grpc.DecodeStub(ch).Stats(worker_pb2.StatsRequest())
                        ),
                        await _code(
                            worker_pb2_grpc.RegistryStub(ch).Register(worker_pb2.WorkerInfo())
                        ),
                        await _code(
                            router_pb2_grpc.RouterStub(ch).ListModels(
                                router_pb2.ListModelsRequest()
                            )
                        ),
                        await _code(
                            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                        ),
                    )
            return results, calls.count
        finally:
            await server.stop(0)

    results, count = asyncio.run(main())
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    assert results["router"] == (ok, denied, denied, ok)
    assert results["prefill"] == (denied, ok, denied, ok)
    assert results["decode"] == (denied, ok, denied, ok)
    assert results["gateway"] == (denied, denied, ok, ok)
    assert results["client"] == (denied, denied, ok, ok)
    assert count == 1 + 2 + 2  # refused calls never reached a servicer


def test_streams_are_authorized_before_the_servicer_runs(pki):
    async def main():
        server, address, calls = await _serve(role_tls(pki, "decode"))
        try:
            codes = {}
            for role in ("router", "prefill"):
                async with aio_channel(address, role_tls(pki, role), peer_role="decode") as ch:
                    call = worker_pb2_grpc.DecodeStub(ch).Session()
                    await call.write(worker_pb2.SessionRequest())
                    try:
                        await call.read()
                        codes[role] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as e:
                        codes[role] = e.code()
                    call.cancel()
            return codes, calls.count
        finally:
            await server.stop(0)

    codes, count = asyncio.run(main())
    assert codes == {"router": grpc.StatusCode.OK, "prefill": grpc.StatusCode.PERMISSION_DENIED}
    assert count == 1


def test_without_a_certificate_or_with_another_ca_nothing_gets_through(pki, tmp_path):
    other = tmp_path / "other"
    write_certs(other)  # a stranger's own CA, with a "router" certificate

    async def main():
        server, address, calls = await _serve(role_tls(pki, "decode"))
        try:
            codes = []
            no_cert = TLSConfig.from_files(ca_certs=str(pki / "ca.pem"))
            for tls in (PLAINTEXT, no_cert, role_tls(other, "router")):
                async with aio_channel(address, tls) as ch:
                    stub = worker_pb2_grpc.DecodeStub(ch)
                    codes.append(await _code(stub.Stats(worker_pb2.StatsRequest(), timeout=5)))
            return codes, calls.count
        finally:
            await server.stop(0)

    codes, count = asyncio.run(main())
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
    assert count == 0


def test_clients_check_the_role_of_the_server_they_dial(pki):
    """A prefill server's KV channel expects a decode certificate: a server holding any other
    role's certificate (here a gateway's) fails the handshake before a byte is sent."""

    async def main():
        server, address, calls = await _serve(role_tls(pki, "gateway"))
        try:
            async with aio_channel(address, role_tls(pki, "prefill"), peer_role="decode") as ch:
                wrong = await _code(
                    worker_pb2_grpc.DecodeStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
                )
            async with aio_channel(address, role_tls(pki, "client"), peer_role="gateway") as ch:
                right = await _code(
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                )
            return wrong, right, calls.count
        finally:
            await server.stop(0)

    wrong, right, count = asyncio.run(main())
    assert (wrong, right, count) == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK, 0)


def test_plaintext_token_mode(pki):
    token_tls = TLSConfig(token="s3cret-token")

    async def main():
        server, address, calls = await _serve(token_tls)
        try:
            out = {}
            for name, tls in (
                ("none", PLAINTEXT),
                ("wrong", TLSConfig(token="guess")),
                ("right", token_tls),
            ):
                async with aio_channel(address, tls) as ch:
                    out[name] = (
                        await _code(
                            worker_pb2_grpc.DecodeStub(ch).Stats(worker_pb2.StatsRequest())
                        ),
                        await _code(
                            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                        ),
                    )
            return address, out, calls.count
        finally:
            await server.stop(0)

    address, out, count = asyncio.run(main())
    unauth, ok = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK
    assert out == {"none": (unauth, ok), "wrong": (unauth, ok), "right": (ok, ok)}
    assert count == 1


def test_sync_channel_sends_the_token():
    token_tls = TLSConfig(token="tok")

    async def main():
        server, address, calls = await _serve(token_tls)
        try:

            def call():
                with channel(address, token_tls) as ch:
                    return worker_pb2_grpc.DecodeStub(ch).Stats(worker_pb2.StatsRequest())

            stats = await asyncio.to_thread(call)
            return stats.num_total_blocks
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == 7


def test_router_api_needs_the_api_key(pki):
    async def main():
        server, address, calls = await _serve(role_tls(pki, "router"), api_key="sk-test")
        try:
            codes = []
            async with aio_channel(address, role_tls(pki, "gateway"), peer_role="router") as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                for md in (
                    (),
                    (("authorization", "Bearer nope"),),
                    (("authorization", "Bearer sk-test"),),
                ):
                    codes.append(
                        await _code(stub.ListModels(router_pb2.ListModelsRequest(), metadata=md))
                    )
            return codes, calls.count
        finally:
            await server.stop(0)

    codes, count = asyncio.run(main())
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert codes == [unauth, unauth, grpc.StatusCode.OK]
    assert count == 1
