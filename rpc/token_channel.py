"""The development-mode shared token on every call of a client channel (rpc/tls.py's
`channel` / `aio_channel` add these when the TLS config carries a token; servers check it in
rpc/auth.py)."""

from __future__ import annotations

from typing import NamedTuple

import grpc

TOKEN_METADATA = "tandem-internal-token"


def _with_token(details, token: str):
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (TOKEN_METADATA, token))
    return details._replace(metadata=metadata)


class _TokenInterceptor:
    def __init__(self, token: str) -> None:
        self.token = token


class _UnaryUnaryToken(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _UnaryStreamToken(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _StreamUnaryToken(_TokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class _StreamStreamToken(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details):
        metadata = [*(details.metadata or ()), (TOKEN_METADATA, self.token)]
        return _SyncDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )  # fmt: skip

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _SyncDetails(
    NamedTuple(
        "_SyncDetails",
        [
            ("method", str),
            ("timeout", object),
            ("metadata", object),
            ("credentials", object),
            ("wait_for_ready", object),
            ("compression", object),
        ],
    ),
    grpc.ClientCallDetails,
):
    pass


def aio_interceptors(token: str) -> list:
    return [
        cls(token)
        for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    ]
