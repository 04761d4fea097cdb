"""OpenAI-shaped errors (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status
of each core status name: every failure of the HTTP front, from a route or from a bound applied
before any route runs (gateway/http_bounds.py), is answered this way."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from gateway.api_types import GatewayError

if TYPE_CHECKING:
    from gateway.openai_protocol import Prepared

# The core's gRPC status names as HTTP statuses and OpenAI error types.
STATUSES = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "INTERNAL": (500, "internal_error"),
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: str,
        message: str,
        param: str | None = None,
        code: str | None = None,
        http_status: int | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.http_status, self.kind = STATUSES.get(status, STATUSES["INTERNAL"])
        self.http_status = http_status or self.http_status
        self.headers = headers

    @classmethod
    def from_gateway(cls, exc: GatewayError, prepared: Prepared | None = None) -> "OpenAIError":
        """The core's error, its field renamed as the client named it."""
        param = prepared.param_name(exc.field) if prepared and exc.field else exc.field or None
        message = exc.message.replace(exc.field, param) if exc.field and param else exc.message
        retry = {"retry-after": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s is not None else None
        return cls(exc.status, message, param, headers=retry)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code or self.status.lower(),
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.http_status, headers=self.headers)

    def raw_http(self) -> bytes:
        """The whole HTTP/1.1 response, closing the connection: for answers written before any
        request was parsed (the connection limit), where there is no ASGI response to send."""
        body = json.dumps(self.body()).encode()
        reason = {
            400: "Bad Request",
            408: "Request Timeout",
            429: "Too Many Requests",
            431: "Request Header Fields Too Large",
        }.get(self.http_status, "Error")
        return (
            f"HTTP/1.1 {self.http_status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode() + body
