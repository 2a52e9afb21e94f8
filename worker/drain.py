"""Graceful drain of a worker on SIGTERM: finish what was admitted, then stop.

    SIGTERM -> health NOT_SERVING -> Deregister (the router sends no new work)
            -> wait until idle for QUIET_S (in-flight work RPCs, engine requests and
               KV handoffs all zero), bounded by --drain-timeout
            -> server.stop -> exit 0
    a second SIGTERM/SIGINT skips the wait.

Idle must hold for a quiet period, not one instant: a request the router dispatched just
before it saw the Deregister can still be on the wire, and a prefill server creates its KV
push task just as the Prefill RPC returns. A static worker (no --router) cannot deregister;
the router notices NOT_SERVING at its next health poll, so its quiet period is longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable

import grpc

from protos import worker_pb2

QUIET_S = 0.3  # after a confirmed Deregister
QUIET_STATIC_S = 1.5  # no Deregister: covers the router's health poll (0.5 s) and a margin
POLL_S = 0.05


def _method(service: str, name: str) -> str:
    return f"/{worker_pb2.DESCRIPTOR.services_by_name[service].full_name}/{name}"


# RPCs that carry a request's work; Stats, Abort, KVEvents, health and reflection do not.
WORK_METHODS = frozenset(
    {
        _method("Decode", "Generate"),
        _method("Prefill", "Prefill"),
        _method("KVTransfer", "Push"),
    }
)


class InFlightRpcs(grpc.aio.ServerInterceptor):
    """Counts the work RPCs this server is running (handler entered, not yet returned)."""

    def __init__(self, methods: frozenset[str] = WORK_METHODS) -> None:
        self.methods = methods
        self.count = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods:
            return handler
        kw = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            counted = self._stream(behavior) if inspect.isasyncgenfunction(behavior) else None
            return grpc.unary_stream_rpc_method_handler(counted or self._unary(behavior), **kw)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary), **kw)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary), **kw)
        return handler

    def _unary(self, behavior):
        async def counted(request, context):
            self.count += 1
            try:
                return await behavior(request, context)
            finally:
                self.count -= 1

        return counted

    def _stream(self, behavior):
        async def counted(request, context):
            self.count += 1
            try:
                # aclosing: the servicer's own cleanup (abort, free blocks) runs before the
                # count drops, also when the call is cancelled between two messages
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                self.count -= 1

        return counted


async def wait_idle(
    busy: Callable[[], Awaitable[int]], timeout_s: float, quiet_s: float, force: asyncio.Event
) -> int:
    """Wait until busy() stays 0 for quiet_s; returns what is still busy (0 when drained)."""
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    while True:
        n = await busy()
        now = time.monotonic()
        if n:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        elif now - idle_since >= quiet_s:
            return 0
        if now >= deadline or force.is_set():
            return n
        try:
            await asyncio.wait_for(force.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass
