"""OpenAI error objects, and the mapping from the router's gRPC status codes."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

# HTTP status -> reason label of tandem:gateway_refused_requests (when none is given)
_REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "not_found",
            413: "body_too_large", 429: "overloaded", 503: "unavailable", 504: "timeout"}  # fmt: skip


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code,
        )  # fmt: skip
        self.headers: dict[str, str] = {"Retry-After": retry_after} if retry_after else {}
        # why the request was refused, for metrics (bounded set of labels)
        self.reason = reason or _REASONS.get(status, "error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def bad_request(
    message: str, param: str | None = None, code: str | None = None, reason: str | None = None
) -> APIError:
    return APIError(400, message, param=param, code=code, reason=reason)


def overloaded(reason: str, retry_after: str = "1", message: str = "") -> APIError:
    return APIError(
        429, message or "The server is overloaded; retry later.", "rate_limit_exceeded",
        code="overloaded", retry_after=retry_after, reason=reason,
    )  # fmt: skip


def unavailable(reason: str, retry_after: str = "5", message: str = "") -> APIError:
    return APIError(
        503, message or "The service is unavailable; retry later.", "service_unavailable",
        code="unavailable", retry_after=retry_after, reason=reason,
    )  # fmt: skip


def from_grpc(e: grpc.aio.AioRpcError) -> APIError:
    md = dict(e.trailing_metadata() or ())
    param, retry = md.get("param"), md.get("retry-after")
    code, msg = e.code(), e.details() or e.code().name
    S = grpc.StatusCode
    if code == S.INVALID_ARGUMENT:
        return APIError(400, msg, param=param)
    if code == S.OUT_OF_RANGE:
        return APIError(400, msg, param=param, code="context_length_exceeded", reason="context")
    if code == S.NOT_FOUND:
        return APIError(404, msg, param=param or "model", code="model_not_found")
    if code == S.RESOURCE_EXHAUSTED:
        return overloaded("router_overloaded", retry or "1", msg)
    if code == S.UNAVAILABLE:
        # also what a call gets while the router is down or restarting
        return unavailable("router_unavailable", retry or "5", msg)
    if code == S.DEADLINE_EXCEEDED:
        return APIError(504, msg, "timeout", code="timeout")
    return APIError(500, msg, "internal_error", code=code.name.lower(), reason="error")
