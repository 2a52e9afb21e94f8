"""OpenAI error objects, and the mapping from the router's gRPC status codes."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code,
        )  # fmt: skip
        self.retry_after = retry_after

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
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_grpc(e: grpc.aio.AioRpcError) -> APIError:
    md = dict(e.trailing_metadata() or ())
    param, retry = md.get("param"), md.get("retry-after")
    code, msg = e.code(), e.details() or e.code().name
    S = grpc.StatusCode
    if code == S.INVALID_ARGUMENT:
        return APIError(400, msg, param=param)
    if code == S.OUT_OF_RANGE:
        return APIError(400, msg, param=param, code="context_length_exceeded")
    if code == S.NOT_FOUND:
        return APIError(404, msg, param=param or "model", code="model_not_found")
    if code == S.RESOURCE_EXHAUSTED:
        return APIError(
            429, msg, "rate_limit_exceeded", code="overloaded", retry_after=retry or "1"
        )
    if code == S.UNAVAILABLE:
        return APIError(
            503, msg, "service_unavailable", code="unavailable", retry_after=retry or "5"
        )
    if code == S.DEADLINE_EXCEEDED:
        return APIError(504, msg, "timeout", code="timeout")
    return APIError(500, msg, "internal_error", code=code.name.lower())
