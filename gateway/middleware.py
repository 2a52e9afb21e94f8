"""The gateway's front door (pure ASGI, so streaming and disconnects pass through untouched).

Per HTTP request, in order, each step refusing with an OpenAI error object:
    count      every response by route and status; refusals by reason
    auth       `Authorization: Bearer KEY`, constant-time compare; only the probes (/health,
               /ready, /live) are open (load balancers and orchestrators call them without
               credentials, and they tell nothing but up/down); /metrics needs the key too, since it shows traffic and
               model names (Prometheus sends it with `authorization: {credentials: KEY}`)
    body size  Content-Length over the limit -> 413 before a byte of the body is read;
               a body without one is counted as it streams in (413 past the limit)
    admission  generation routes take a slot (gateway.admission) or get 429 + Retry-After
"""

from __future__ import annotations

import hmac

from gateway.admission import Admission, Refused
from gateway.config import GatewayConfig
from gateway.errors import APIError, overloaded
from gateway.metrics import GatewayMetrics

GENERATE_ROUTES = ("/v1/completions", "/v1/chat/completions")
PROBE_ROUTES = ("/health", "/ready", "/live")
KNOWN_ROUTES = (
    *PROBE_ROUTES,
    "/metrics",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    *GENERATE_ROUTES,
)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


class Guard:
    def __init__(self, app, config: GatewayConfig, metrics: GatewayMetrics, admission: Admission):
        self.app, self.config, self.metrics, self.admission = app, config, metrics, admission
        self.key = config.api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"  # bounded label cardinality
        status = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send, path)
        finally:
            code = status[0] if status else 499  # nothing sent: the client left first
            self.metrics.http.labels(route, str(code)).inc()

    async def _refuse(self, scope, receive, send, err: APIError):
        self.metrics.refused.labels(err.reason).inc()
        await err.response()(scope, receive, send)

    async def _guarded(self, scope, receive, send, path):
        headers = dict(scope["headers"])
        if self.key and path not in PROBE_ROUTES and not self._authorized(headers):
            err = APIError(401, "Incorrect or missing API key.", code="invalid_api_key")
            return await self._refuse(scope, receive, send, err)
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            err = _too_large(limit)
            err.headers["Connection"] = "close"  # the unread body must not be parsed next
            return await self._refuse(scope, receive, send, err)

        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        if path not in GENERATE_ROUTES or scope["method"] != "POST":
            return await self.app(scope, bounded_receive, send)
        try:
            await self.admission.acquire()
        except Refused as e:
            return await self._refuse(scope, receive, send, overloaded(e.reason))
        try:
            await self.app(scope, bounded_receive, send)
        finally:
            self.admission.release()

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest runs in time independent of where the strings differ
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
