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

api_key= (default: env TANDEM_API_KEY) is sent as `authorization: Bearer <key>` on every
call. A refusal that says when to come back (RESOURCE_EXHAUSTED or UNAVAILABLE with
`retry-after` metadata) is retried up to max_retries times after that many seconds (at most
MAX_RETRY_AFTER_S), for calls that are safe to repeat: Tokenize, Detokenize, ListModels, and
a Generate that has not yielded anything yet. The timeout applies to each attempt.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from protos import common_pb2, router_pb2, router_pb2_grpc
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel, channel
from tandem.records import Usage

_FINISH = {1: "stop", 2: "length", 3: "abort", 4: "error"}
_SAMPLING = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}
_RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
MAX_RETRY_AFTER_S = 30.0  # a longer wait asked by the server is cut to this
API_KEY_ENV = "TANDEM_API_KEY"


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
        self.retry_after = _retry_after(md)
        super().__init__(f"{self.code}: {self.details}")


def _retry_after(md: dict) -> float | None:
    """Seconds from `retry-after` metadata; None when absent or not a number >= 0."""
    try:
        value = float(md["retry-after"])
    except (KeyError, ValueError):
        return None
    return value if 0 <= value < float("inf") else None


class _Retries:
    """The credentials and retry rule both clients share."""

    def __init__(self, api_key: str | None, max_retries: int) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.max_retries = max_retries

    def delay(self, e: grpc.RpcError, attempt: int) -> float | None:
        """Seconds to wait before trying again, or None: give up (raise e)."""
        if attempt >= self.max_retries or e.code() not in _RETRYABLE:
            return None
        seconds = _retry_after(dict(e.trailing_metadata() or ()))
        return None if seconds is None else min(seconds, MAX_RETRY_AFTER_S)


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
        api_key: str | None = None,  # None: env TANDEM_API_KEY
        max_retries: int = 2,
    ):
        self.channel = channel(address, tls, peer_role="router")
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout
        self._retries = _Retries(api_key, max_retries)

    def generate(self, prompt=None, **kwargs) -> Iterator[Chunk]:
        req = build_request(prompt, **kwargs)
        attempt = 0
        while True:
            call = self.stub.Generate(req, timeout=self.timeout, metadata=self._retries.metadata)
            started = False
            try:
                for c in call:
                    started = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                # once a chunk is out, a retry would repeat it: only a refusal is retried
                delay = None if started else self._retries.delay(e, attempt)
                if delay is None:
                    raise TandemError(e) from None
            finally:
                call.cancel()  # stopped early: the router aborts the request everywhere
            time.sleep(delay)
            attempt += 1

    def complete(self, prompt=None, **kwargs) -> Completion:
        col = _Collector()
        for ch in self.generate(prompt, **kwargs):
            col.add(ch)
        return col.result()

    def _unary(self, method, request, retry: bool = True):
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout, metadata=self._retries.metadata)
            except grpc.RpcError as e:
                delay = self._retries.delay(e, attempt) if retry else None
                if delay is None:
                    raise TandemError(e) from None
            time.sleep(delay)
            attempt += 1

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
        return self._unary(self.stub.Abort, req, retry=False).found

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
        api_key: str | None = None,  # None: env TANDEM_API_KEY
        max_retries: int = 2,
    ):
        self.channel = aio_channel(address, tls, peer_role="router")
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout
        self._retries = _Retries(api_key, max_retries)

    async def generate(self, prompt=None, **kwargs) -> AsyncIterator[Chunk]:
        req = build_request(prompt, **kwargs)
        attempt = 0
        while True:
            call = self.stub.Generate(req, timeout=self.timeout, metadata=self._retries.metadata)
            started = False
            try:
                async for c in call:
                    started = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                delay = None if started else self._retries.delay(e, attempt)
                if delay is None:
                    raise TandemError(e) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            attempt += 1

    async def complete(self, prompt=None, **kwargs) -> Completion:
        col = _Collector()
        async for ch in self.generate(prompt, **kwargs):
            col.add(ch)
        return col.result()

    async def _unary(self, method, request, retry: bool = True):
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.timeout, metadata=self._retries.metadata)
            except grpc.RpcError as e:
                delay = self._retries.delay(e, attempt) if retry else None
                if delay is None:
                    raise TandemError(e) from None
            await asyncio.sleep(delay)
            attempt += 1

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
        return (await self._unary(self.stub.Abort, req, retry=False)).found

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
