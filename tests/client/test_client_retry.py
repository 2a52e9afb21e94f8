"""TandemClient's API key and Retry-After handling against a real grpc server on 127.0.0.1
whose Router refuses the first calls with RESOURCE_EXHAUSTED + retry-after, then answers."""

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from protos import router_pb2, router_pb2_grpc
from router.client import AsyncTandemClient, TandemClient, TandemError

pytestmark = pytest.mark.timeout(30)


class _Busy(router_pb2_grpc.RouterServicer):
    """Refuses the first `refusals` calls of each method, then serves; records when each call
    came and the authorization metadata it carried."""

    def __init__(self, refusals: int, retry_after: str = "1", code=None, stream_then_fail=False):
        self.refusals, self.retry_after = refusals, retry_after
        self.code = code or grpc.StatusCode.RESOURCE_EXHAUSTED
        self.stream_then_fail = stream_then_fail
        self.calls: dict[str, list[float]] = {}
        self.auth: list[str | None] = []
        self.lock = threading.Lock()

    def _arrive(self, method: str, context) -> bool:
        """True: refuse this call."""
        with self.lock:
            self.calls.setdefault(method, []).append(time.monotonic())
            self.auth.append(dict(context.invocation_metadata()).get("authorization"))
            return len(self.calls[method]) <= self.refusals

    def _refuse(self, context):
        md = (("retry-after", self.retry_after),) if self.retry_after else ()
        context.abort_with_status(_Status(self.code, "busy, come back later", md))

    def Generate(self, request, context):
        if self._arrive("Generate", context) and not self.stream_then_fail:
            self._refuse(context)
        yield router_pb2.GenerateResponse(request_id="r", index=0, token_ids=[7], text="a")
        if self.stream_then_fail:
            self._refuse(context)  # after a chunk: a retry would repeat it
        yield router_pb2.GenerateResponse(request_id="r", index=0, token_ids=[8], text="b")

    def Tokenize(self, request, context):
        if self._arrive("Tokenize", context):
            self._refuse(context)
        return router_pb2.TokenizeResponse(token_ids=[1, 2])

    def ListModels(self, request, context):
        if self._arrive("ListModels", context):
            self._refuse(context)
        return router_pb2.ListModelsResponse(models=[router_pb2.ModelCard(id="tiny")])


class _Status(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


@pytest.fixture
def serve():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(None)


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_sync_client_retries_after_the_servers_delay(serve):
    busy = _Busy(refusals=2)
    with TandemClient(serve(busy), api_key="sekret") as c:
        assert c.complete("hi").texts == ["ab"]
        assert c.tokenize("hi") == [1, 2]
        assert c.models() == ["tiny"]
    for method in ("Generate", "Tokenize", "ListModels"):
        calls = busy.calls[method]
        assert len(calls) == 3  # two refusals, then the answer
        assert all(0.9 <= g < 2.0 for g in _gaps(calls)), _gaps(calls)  # retry-after: 1
    assert set(busy.auth) == {"Bearer sekret"}


def test_gives_up_after_max_retries_and_without_retry_after(serve):
    busy = _Busy(refusals=5, retry_after="0")
    with TandemClient(serve(busy), max_retries=2, api_key="") as c:
        with pytest.raises(TandemError) as e:
            c.models()
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after == 0
    assert len(busy.calls["ListModels"]) == 3 and busy.auth == [None] * 3  # no key: none sent

    plain = _Busy(refusals=1, retry_after="", code=grpc.StatusCode.UNAVAILABLE)
    with TandemClient(serve(plain)) as c:
        with pytest.raises(TandemError):
            c.tokenize("hi")  # no retry-after: the server did not ask for a retry
    assert len(plain.calls["Tokenize"]) == 1


def test_a_started_generate_is_never_retried(serve):
    busy = _Busy(refusals=1, retry_after="0", stream_then_fail=True)
    with TandemClient(serve(busy)) as c:
        got = []
        with pytest.raises(TandemError):
            for chunk in c.generate("hi"):
                got.append(chunk.text)
    assert got == ["a"] and len(busy.calls["Generate"]) == 1


def test_async_client_retries_and_sends_the_key_from_the_environment(serve, monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEY", "from-env")
    busy = _Busy(refusals=1, code=grpc.StatusCode.UNAVAILABLE)
    address = serve(busy)

    async def main():
        async with AsyncTandemClient(address) as c:
            return (await c.complete("hi")).texts, await c.models()

    texts, models = asyncio.run(main())
    assert texts == ["ab"] and models == ["tiny"]
    assert len(busy.calls["Generate"]) == len(busy.calls["ListModels"]) == 2
    assert all(0.9 <= g < 2.0 for g in _gaps(busy.calls["Generate"]))
    assert set(busy.auth) == {"Bearer from-env"}
