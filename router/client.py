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

Beyond sampling: tools (OpenAI's [{"type": "function", "function": {...}}] or the function
dicts), tool_choice ("none" | "auto" | "required" | a function name, or OpenAI's {"type":
"function", "function": {"name": ...}}), structured (a tandem.records.StructuredOutput or
vLLM's structured_outputs dict: {"json": schema} | {"regex": ...} | {"choice": [...]} |
{"grammar": ...} | {"json_object": True} | {"structural_tag": ...}), prompt_logprobs (k),
chat_template_kwargs (a dict). Chunks carry reasoning_text, tool_calls (ToolCallDelta pieces)
and prompt_logprobs; complete() assembles each choice's tool calls.

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

from protos import router_pb2, router_pb2_grpc
from router.client_requests import build_request, tokenize_request
from router.tool_parsers import ToolCall, ToolCallDelta
from rpc.tls import PLAINTEXT, TLSConfig, aio_channel, channel
from tandem.records import Usage

_FINISH = {1: "stop", 2: "length", 3: "abort", 4: "error"}
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
    reasoning_text: str = ""  # new reasoning text (router started with --reasoning-parser)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)  # pieces of tool calls
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob messages, first chunk


@dataclass(slots=True)
class Completion:
    request_id: str
    texts: list[str]  # per choice
    finish_reasons: list[str | None]
    usage: Usage | None
    reasoning_texts: list[str] = field(default_factory=list)  # per choice
    tool_calls: list[list[ToolCall]] = field(default_factory=list)  # per choice
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob messages (choice 0)


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


def _chunk(c: router_pb2.GenerateResponse) -> Chunk:
    usage = None
    if c.HasField("usage"):
        u = c.usage
        # (total_tokens is prompt + completion: Usage computes it as the router did)
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    calls = [ToolCallDelta(d.index, d.id, d.name, d.arguments) for d in c.tool_calls]
    return Chunk(
        c.request_id, c.index, c.text, list(c.token_ids), _FINISH.get(c.finish_reason),
        c.stop_reason, usage, list(c.logprobs), c.reasoning_text, calls,
        list(c.prompt_logprobs),
    )  # fmt: skip


class _Collector:
    def __init__(self):
        self.texts: dict[int, str] = {}
        self.reasoning: dict[int, str] = {}
        self.calls: dict[int, list[ToolCall]] = {}
        self.reasons: dict[int, str | None] = {}
        self.usage, self.request_id, self.prompt_logprobs = None, "", []

    def add(self, ch: Chunk) -> None:
        self.request_id = ch.request_id
        i = ch.index
        self.texts[i] = self.texts.get(i, "") + ch.text
        self.reasoning[i] = self.reasoning.get(i, "") + ch.reasoning_text
        calls = self.calls.setdefault(i, [])
        for d in ch.tool_calls:  # a call's first piece has its id and name; later ones add
            if d.index == len(calls):
                calls.append(ToolCall(d.id, d.name, d.arguments))
            else:
                calls[d.index].arguments += d.arguments
        if ch.prompt_logprobs and i == 0:
            self.prompt_logprobs = ch.prompt_logprobs
        self.reasons[i] = ch.finish_reason or self.reasons.get(i)
        self.usage = ch.usage or self.usage

    def result(self) -> Completion:
        idx = sorted(self.texts)
        return Completion(
            self.request_id, [self.texts[i] for i in idx], [self.reasons[i] for i in idx],
            self.usage, [self.reasoning[i] for i in idx], [self.calls[i] for i in idx],
            self.prompt_logprobs,
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

    def tokenize(
        self, text: str | None = None, messages: list[dict] | None = None, **kwargs
    ) -> list[int]:
        """kwargs: tools, chat_template_kwargs (chat), as generate() takes them."""
        req = tokenize_request(text, messages, **kwargs)
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

    async def tokenize(
        self, text: str | None = None, messages: list[dict] | None = None, **kwargs
    ) -> list[int]:
        req = tokenize_request(text, messages, **kwargs)
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
