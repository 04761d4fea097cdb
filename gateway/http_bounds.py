"""The HTTP front's bounds, applied before the work they bound (README "Bounds").

- `bounded_protocol`: uvicorn's HTTP protocol with two guards uvicorn lacks: a connection past
  `max_connections` is answered 429 (OpenAI JSON) and closed before anything is parsed, and a
  request whose headers have not all arrived `header_timeout_s` after its first byte (or after
  the connection opened) is dropped: a slow client cannot hold a connection open byte by byte.
- `BodyLimit`: ASGI middleware that refuses a body over `max_body_bytes` (413, from its
  Content-Length before reading, or as soon as a chunked body passes the cap) and a body that
  takes longer than `body_timeout_s` to arrive (408). The app then reads the body from memory.

Like Envoy's `request_headers_timeout`, `max_request_bytes` and connection limits; the write-idle
timeout of a stream whose client stopped reading is the SSE response's (gateway/openai_answer.py).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import GatewayConfig
from gateway.openai_errors import OpenAIError


@dataclass(frozen=True)
class HttpBounds:
    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    keepalive_s: float

    @classmethod
    def from_config(cls, config: GatewayConfig) -> "HttpBounds":
        return cls(config.max_request_bytes, config.http_header_timeout_s, config.http_body_timeout_s,
                   config.http_max_connections, config.http_keepalive_s)


def bounded_protocol(bounds: HttpBounds) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the connection limit and the header timeout."""

    class BoundedProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > bounds.max_connections:
                error = OpenAIError("RESOURCE_EXHAUSTED", f"the gateway holds its maximum of {bounds.max_connections} "
                                    "HTTP connections; retry later", code="too_many_connections")
                transport.write(error.raw_http())
                transport.close()
                return
            self._start_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._start_header_timer()  # each request on a kept-alive connection gets its own

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refused (uvicorn's own answer is plain text)."""
            error = OpenAIError("INVALID_ARGUMENT", f"malformed HTTP request: {msg}", code="bad_http_request")
            if not self.transport.is_closing():
                self.transport.write(error.raw_http())
                self.transport.close()

        def _start_header_timer(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(bounds.header_timeout_s, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # no request of it is being answered
                error = OpenAIError("INVALID_ARGUMENT", f"the request's headers did not arrive within "
                                    f"{bounds.header_timeout_s:g} s", code="request_timeout", http_status=408)
                if not self.transport.is_closing():
                    self.transport.write(error.raw_http())
                    self.transport.close()

    return BoundedProtocol


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class BodyLimit:
    """ASGI middleware: the whole body read up front, within its size and time bounds, then
    handed to the app; later `receive()` calls go to the connection (disconnect detection)."""

    def __init__(self, app, bounds: HttpBounds) -> None:
        self.app, self.bounds = app, bounds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.bounds.max_body_bytes
        too_large = OpenAIError("INVALID_ARGUMENT", f"the request body is larger than {limit} bytes "
                                "(max_request_bytes)", code="request_too_large", http_status=413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return await too_large.response()(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.bounds.body_timeout_s)
        except _BodyTooLarge:
            return await too_large.response()(scope, receive, send)
        except asyncio.TimeoutError:
            error = OpenAIError("INVALID_ARGUMENT", f"the request body did not arrive within "
                                f"{self.bounds.body_timeout_s:g} s", code="request_timeout", http_status=408)
            return await error.response()(scope, receive, send)
        except _ClientGone:
            return None
        handed = False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive, limit: int) -> bytes:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge()
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)
