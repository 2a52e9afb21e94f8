"""What a stranger on the network, or a holder of the wrong credential, tries against a running
stack; each helper returns the gRPC status codes the stack answered with.

A `Target` is any running stack: `tandem serve` with its defaults, or the compose layout run as
processes. Its `cert_dir` holds the stack's own role certificates (rpc/pki.py names), which the
tests use to play an insider of the wrong role (a gRPC API client, a prefill server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from rpc.pki import cert_paths, write_certs
from rpc.tls import PLAINTEXT, TLSConfig, channel

MODEL_NAME = "SmolLM2-135M-Instruct"
OK = grpc.StatusCode.OK
TIMEOUT_S = 10


@dataclass
class Target:
    base_url: str  # the gateway, ".../v1"
    router: str  # host:port
    prefill: list[str]
    decode: list[str]
    cert_dir: Path  # this stack's role certificates
    api_key: str
    model: str = MODEL_NAME
    extra: dict = field(default_factory=dict)

    def tls(self, role: str) -> TLSConfig:
        cert, key = cert_paths(self.cert_dir, role)
        return TLSConfig.from_files(str(cert), str(key), str(self.cert_dir / "ca.pem"))


def stranger_credentials(tmp: Path) -> dict[str, TLSConfig]:
    """Credentials of someone outside the stack: none, or a CA of their own (with a
    certificate claiming the router's role)."""
    write_certs(tmp)
    cert, key = cert_paths(tmp, "router")
    return {
        "plaintext": PLAINTEXT,
        "own_ca": TLSConfig.from_files(str(cert), str(key), str(tmp / "ca.pem")),
    }


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return OK


def health(address: str, tls: TLSConfig) -> grpc.StatusCode:
    with channel(address, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S))


def serving(address: str, tls: TLSConfig) -> bool:
    with channel(address, tls) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def reflection(address: str, tls: TLSConfig) -> grpc.StatusCode:
    with channel(address, tls) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        return code_of(lambda: list(stub.ServerReflectionInfo(iter([req]), timeout=TIMEOUT_S)))


def register(router: str, tls: TLSConfig, role: int, address: str, kv_address: str = ""):
    info = worker_pb2.WorkerInfo(
        role=role, address=address, kv_address=kv_address, model=MODEL_NAME,
        block_size=16, num_blocks=100_000, max_num_seqs=256,
    )  # fmt: skip
    with channel(router, tls) as ch:
        stub = worker_pb2_grpc.RegistryStub(ch)
        return code_of(lambda: stub.Register(info, timeout=TIMEOUT_S))


def deregister_guesses(router: str, tls: TLSConfig) -> set[grpc.StatusCode]:
    """Deregister with the ids an attacker would guess; the codes answered."""
    codes = set()
    with channel(router, tls) as ch:
        stub = worker_pb2_grpc.RegistryStub(ch)
        for guess in ["0", "1", "2", "w-0", "w-1", "prefill-0", "decode-0", ""]:
            req = worker_pb2.DeregisterRequest(worker_id=guess)
            codes.add(code_of(lambda r=req: stub.Deregister(r, timeout=TIMEOUT_S)))
    return codes


def generate(router: str, tls: TLSConfig, api_key: str = "", text="Hi", max_tokens=8):
    """Router.Generate (public API); (status, the chunks)."""
    req = router_pb2.GenerateRequest(
        model=MODEL_NAME, text=text,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )  # fmt: skip
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    chunks = []
    with channel(router, tls) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        def run():
            chunks.extend(stub.Generate(req, metadata=metadata, timeout=120))

        return code_of(run), chunks


def list_models(router: str, tls: TLSConfig, api_key: str = ""):
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    out = []
    with channel(router, tls) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        def run():
            out.append(stub.ListModels(router_pb2.ListModelsRequest(), metadata=metadata))

        return code_of(run), out


def decode_session(address: str, tls: TLSConfig, request: worker_pb2.DecodeRequest):
    """One request on a Decode.Session; (status, events)."""
    events = []
    with channel(address, tls) as ch:
        stub = worker_pb2_grpc.DecodeStub(ch)

        def run():
            call = stub.Session(iter([worker_pb2.SessionRequest(generate=request)]), timeout=60)
            for batch in call:
                events.extend(batch.events)
                last = events[-1]
                if last.HasField("error") or last.tokens.finish_reason:
                    call.cancel()
                    return

        code = code_of(run)
        return (OK if code == grpc.StatusCode.CANCELLED else code), events


def prefill(address: str, tls: TLSConfig, request: worker_pb2.PrefillRequest):
    with channel(address, tls) as ch:
        stub = worker_pb2_grpc.PrefillStub(ch)
        return code_of(lambda: stub.Prefill(request, timeout=60))


def kv_push(decode_address: str, tls: TLSConfig, handoff_id: str = "r-0#1"):
    """A grpc-transport KV push for a handoff the caller does not own."""
    msgs = [
        worker_pb2.KVTransferMessage(
            handoff_id=handoff_id, begin=worker_pb2.KVBegin(transport="grpc", num_slabs=1)
        ),
        worker_pb2.KVTransferMessage(
            handoff_id=handoff_id,
            chunk=worker_pb2.KVChunk(
                layer_start=0,
                layer_end=1,
                block_offset=0,
                num_blocks=1,
                dtype="float32",
                shape=[1, 2, 1, 16, 3, 64],
                data=b"\x00" * 4 * 2 * 16 * 3 * 64,
            ),
        ),  # fmt: skip
    ]
    with channel(decode_address, tls, peer_role="decode") as ch:
        stub = worker_pb2_grpc.KVTransferStub(ch)
        replies = []

        def run():
            replies.extend(stub.Transfer(iter(msgs), timeout=TIMEOUT_S))

        return code_of(run), replies


def worker_stats(address: str, tls: TLSConfig, role: str) -> worker_pb2.WorkerStats:
    with channel(address, tls) as ch:
        stub = (worker_pb2_grpc.DecodeStub if role == "decode" else worker_pb2_grpc.PrefillStub)(ch)
        return stub.Stats(worker_pb2.StatsRequest(), timeout=TIMEOUT_S)


class KVTrap:
    """An attacker's KV receiver: a gRPC server with its own CA's `decode` certificate that
    records every Transfer message a prefill server sends it."""

    def __init__(self, cert_dir: Path) -> None:
        import asyncio
        import threading

        write_certs(cert_dir)
        cert, key = cert_paths(cert_dir, "decode")
        self.tls = TLSConfig.from_files(str(cert), str(key), str(cert_dir / "ca.pem"))
        self.messages: list = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        trap = self

        class Servicer(worker_pb2_grpc.KVTransferServicer):
            async def Transfer(self, request_iterator, context):
                async for msg in request_iterator:
                    trap.messages.append(msg)
                    yield worker_pb2.KVTransferReply(reply=worker_pb2.KV_REPLY_GRANT)

        async def start():
            from rpc.tls import add_port

            self._server = grpc.aio.server()
            worker_pb2_grpc.add_KVTransferServicer_to_server(Servicer(), self._server)
            self.port = add_port(self._server, "127.0.0.1:0", self.tls)
            await self._server.start()
            ready.set()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(30)
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def kv_target(address: str, capability: bytes = b"", shm_path: str = "") -> worker_pb2.KVTarget:
    """A KVTarget an attacker makes up: their own address, blocks of their choosing, perhaps a
    pool file of their choosing."""
    t = worker_pb2.KVTarget(
        handoff_id="evil#1", decode_kv_address=address, block_ids=[0, 1, 2, 3],
        num_cached_tokens=0, block_size=16, transport="grpc", transports=["shm", "grpc"],
        capability=capability,
    )  # fmt: skip
    if shm_path:
        t.pool.CopyFrom(
            worker_pb2.KVPoolExport(
                transport="shm",
                pool_id="evil",
                host_id="x",
                shape=[30, 2, 64, 16, 3, 64],
                dtype="float32",
                shm_path=shm_path,
            )  # fmt: skip
        )
    return t
