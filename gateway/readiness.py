"""Is the router there? The gRPC health check behind /health and /ready, cached briefly.

A load balancer that sees 200 from a gateway whose router is down keeps sending it requests
that can only fail with 503; so readiness is the router's health, asked over the same channel
the requests use (same credentials, same reconnect backoff). Probes come often and from many
places: one check per CACHE_S at most, and concurrent probes share the check in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("tandem.gateway")

CACHE_S = 1.0  # an answer is reused this long
CHECK_TIMEOUT_S = 1.0  # a router slower than this to answer its health check is not ready


class RouterReadiness:
    def __init__(self, channel: grpc.aio.Channel, cache_s: float = CACHE_S) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self.cache_s = cache_s
        self._checked_at = -float("inf")
        self._ready = False
        self._inflight: asyncio.Task | None = None
        self._logged: bool | None = None  # the state last logged

    async def ready(self) -> bool:
        if time.monotonic() - self._checked_at < self.cache_s:
            return self._ready
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._check())
        task = self._inflight
        # shield: one probe's client leaving must not cancel the check the others wait on
        return await asyncio.shield(task)

    async def _check(self) -> bool:
        try:
            return await self._ask()
        finally:
            self._inflight = None

    async def _ask(self) -> bool:
        try:
            resp = await self._stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
            ready = resp.status == health_pb2.HealthCheckResponse.SERVING
            code = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.aio.AioRpcError as e:
            ready, code = False, e.code().name
        if ready != self._logged:  # transitions only: probes come every few seconds
            # losing a router that was ready needs attention; not ready yet at start does not
            level = logging.WARNING if self._logged and not ready else logging.INFO
            log.log(level, "event=router_%s status=%s", "ready" if ready else "not_ready", code)
            self._logged = ready
        self._ready, self._checked_at = ready, time.monotonic()
        return ready
