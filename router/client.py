"""A small typed client for tandem's public Router gRPC API (sync and asyncio).

Imports only grpc, the generated protos and the core's torch-free records (no torch), so
other services can use it:

    from router.client import TandemClient
    with TandemClient("127.0.0.1:50051") as c:   # tls=TLSConfig.from_files(...) for TLS
        for chunk in c.generate("Hello", max_tokens=16):
            print(chunk.text, end="")

    async with AsyncTandemClient("127.0.0.1:50051") as c:
        async for chunk in c.generate(messages=[{"role": "user", "content": "hi"}]):
            ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from protos import common_pb2, router_pb2, router_pb2_grpc
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel, channel
from tandem.records import Usage

_FINISH = {1: "stop", 2: "length", 3: "abort", 4: "error"}
_SAMPLING = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}


@dataclass(slots=True)
class Chunk:
    """One streamed piece of one choice, as a client reads it off the wire.

    Not the router's ChoiceChunk (router/types.py), which is the engine's record of the same
    piece before the servicer converts it: this one has OpenAI's finish_reason string, the
    wire's TokenLogprob messages (with token text) and the request id.
    """

    request_id: str
    index: int  # choice, 0..n-1
    text: str  # new text
    token_ids: list[int]  # new tokens
    finish_reason: str | None  # "stop", "length", "abort", "error" on the choice's last chunk
    stop_reason: str = ""
    usage: Usage | None = None  # on the stream's last chunk
    logprobs: list = field(default_factory=list)  # tandem.v1.TokenLogprob messages


@dataclass(slots=True)
class Completion:
    request_id: str
    texts: list[str]  # per choice
    finish_reasons: list[str | None]
    usage: Usage | None


class TandemError(Exception):
    """A refused or failed call: code is the gRPC status name, param the offending field."""

    def __init__(self, e: grpc.RpcError):
        md = dict(e.trailing_metadata() or ())
        self.code = e.code().name
        self.details = e.details()
        self.param = md.get("param")
        self.retry_after = float(md["retry-after"]) if "retry-after" in md else None
        super().__init__(f"{self.code}: {self.details}")


def build_request(
    prompt: str | list[int] | None = None,
    *,
    messages: list[dict] | None = None,
    model: str = "",
    n: int = 1,
    stop: list[str] | str | None = None,
    request_id: str = "",
    echo: bool = False,
    include_stop_str_in_output: bool = False,
    skip_special_tokens: bool = True,
    **sampling,
) -> router_pb2.GenerateRequest:
    unknown = set(sampling) - _SAMPLING
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
    req = router_pb2.GenerateRequest(
        model=model,
        n=n,
        request_id=request_id,
        echo=echo,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        include_stop_str_in_output=include_stop_str_in_output,
        skip_special_tokens=skip_special_tokens,
        sampling=common_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
    )
    if messages is not None:
        req.chat.messages.extend(router_pb2.ChatMessage(**m) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def _chunk(c: router_pb2.GenerateResponse) -> Chunk:
    usage = None
    if c.HasField("usage"):
        u = c.usage
        # (total_tokens is prompt + completion: Usage computes it as the router did)
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    return Chunk(
        c.request_id, c.index, c.text, list(c.token_ids), _FINISH.get(c.finish_reason),
        c.stop_reason, usage, list(c.logprobs),
    )  # fmt: skip


class _Collector:
    def __init__(self):
        self.texts: dict[int, str] = {}
        self.reasons: dict[int, str | None] = {}
        self.usage, self.request_id = None, ""

    def add(self, ch: Chunk) -> None:
        self.request_id = ch.request_id
        self.texts[ch.index] = self.texts.get(ch.index, "") + ch.text
        self.reasons[ch.index] = ch.finish_reason or self.reasons.get(ch.index)
        self.usage = ch.usage or self.usage

    def result(self) -> Completion:
        idx = sorted(self.texts)
        return Completion(
            self.request_id, [self.texts[i] for i in idx], [self.reasons[i] for i in idx],
            self.usage,
        )  # fmt: skip


class TandemClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout: float | None = None,
        tls: TLSConfig = PLAINTEXT,  # TLSConfig.from_files(ca_certs=..., certfile=..., ...)
    ):
        self.channel = channel(address, tls)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout

    def generate(self, prompt=None, **kwargs) -> Iterator[Chunk]:
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout)
        try:
            for c in call:
                yield _chunk(c)
        except grpc.RpcError as e:
            raise TandemError(e) from None
        finally:
            call.cancel()  # stopped early: the router aborts the request everywhere

    def complete(self, prompt=None, **kwargs) -> Completion:
        col = _Collector()
        for ch in self.generate(prompt, **kwargs):
            col.add(ch)
        return col.result()

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise TandemError(e) from None

    def tokenize(self, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        req = router_pb2.TokenizeRequest()
        if messages is not None:
            req.chat.messages.extend(router_pb2.ChatMessage(**m) for m in messages)
        else:
            req.text = text or ""
        return list(self._unary(self.stub.Tokenize, req).token_ids)

    def detokenize(self, token_ids: list[int]) -> str:
        req = router_pb2.DetokenizeRequest(token_ids=token_ids)
        return self._unary(self.stub.Detokenize, req).text

    def models(self) -> list[str]:
        return [
            m.id for m in self._unary(self.stub.ListModels, router_pb2.ListModelsRequest()).models
        ]

    def abort(self, request_id: str) -> bool:
        req = router_pb2.RouterAbortRequest(request_id=request_id)
        return self._unary(self.stub.Abort, req).found

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncTandemClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout: float | None = None,
        tls: TLSConfig = PLAINTEXT,
    ):
        self.channel = aio_channel(address, tls)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout

    async def generate(self, prompt=None, **kwargs) -> AsyncIterator[Chunk]:
        call = self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout)
        try:
            async for c in call:
                yield _chunk(c)
        except grpc.RpcError as e:
            raise TandemError(e) from None
        finally:
            call.cancel()

    async def complete(self, prompt=None, **kwargs) -> Completion:
        col = _Collector()
        async for ch in self.generate(prompt, **kwargs):
            col.add(ch)
        return col.result()

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise TandemError(e) from None

    async def tokenize(self, text: str | None = None, messages: list[dict] | None = None):
        req = router_pb2.TokenizeRequest()
        if messages is not None:
            req.chat.messages.extend(router_pb2.ChatMessage(**m) for m in messages)
        else:
            req.text = text or ""
        return list((await self._unary(self.stub.Tokenize, req)).token_ids)

    async def detokenize(self, token_ids: list[int]) -> str:
        req = router_pb2.DetokenizeRequest(token_ids=token_ids)
        return (await self._unary(self.stub.Detokenize, req)).text

    async def models(self) -> list[str]:
        resp = await self._unary(self.stub.ListModels, router_pb2.ListModelsRequest())
        return [m.id for m in resp.models]

    async def abort(self, request_id: str) -> bool:
        req = router_pb2.RouterAbortRequest(request_id=request_id)
        return (await self._unary(self.stub.Abort, req)).found

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
