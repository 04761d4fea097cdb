"""The HTTP front's bounds, applied before the work they bound (docs/operations.md, "Isolation and bounds").

- `bounded_protocol`: uvicorn's HTTP protocol with the guards uvicorn lacks: a connection past
  `max_connections` is answered 429 (OpenAI JSON) and closed before anything is parsed; a
  request's line and headers must arrive within `header_timeout_s` of the connection opening or
  the last response (431 past MAX_HEADER_BYTES, 408 past the time), so a slow client cannot hold
  a connection byte by byte; and a client that reads nothing of a response for `write_timeout_s`
  (the socket's buffers full) is dropped, which ends a stream as if it had left (its blocks freed).
- `BodyLimit`: ASGI middleware that refuses a body over `max_body_bytes` (413, from its
  Content-Length before reading, or as soon as a chunked body passes the cap) and a body that
  takes longer than `body_timeout_s` to arrive (408). The app then reads the body from memory.

Like Envoy's `request_headers_timeout`, `max_request_headers_kb`, `max_request_bytes`, connection
limits and stream idle timeout. Every refusal closes the connection (`connection: close`).
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
    write_timeout_s: float

    @classmethod
    def from_config(cls, config: GatewayConfig) -> "HttpBounds":
        return cls(
            config.max_request_bytes,
            config.http_header_timeout_s,
            config.http_body_timeout_s,
            config.http_max_connections,
            config.http_keepalive_s,
            config.stream_write_timeout_s,
        )


MAX_HEADER_BYTES = 64 * 1024  # a request line and headers past this: 431 (uvicorn buffers them unbounded)


def bounded_protocol(bounds: HttpBounds) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the connection limit, the header size and time bounds,
    and the write-idle bound."""

    class BoundedProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes: int | None = None  # bytes of the request being read, until its headers are complete
        _write_timer: asyncio.TimerHandle | None = None
        _unsent_bytes = 0  # what the transport still held when the write timer was (re)armed

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > bounds.max_connections:
                self._refuse(
                    OpenAIError(
                        "RESOURCE_EXHAUSTED",
                        f"the gateway holds its maximum of {bounds.max_connections} HTTP connections; retry later",
                        code="too_many_connections",
                    )
                )
                return
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_bytes is not None and not self.transport.is_closing():
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._refuse(
                        OpenAIError(
                            "INVALID_ARGUMENT",
                            f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes",
                            code="headers_too_large",
                            http_status=431,
                        )
                    )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # a pipelined request; else the bound already runs (not restarted)
                self._await_headers()

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            self._header_bytes = None
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            """Kept alive: whatever comes next (a request, stray bytes, a body nobody reads) must
            make a request's headers within the bound, or the connection goes. (A pipelined
            request that was waiting has its headers already: it is not bounded again.)"""
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._await_headers(max(bounds.header_timeout_s, bounds.keepalive_s))

        def pause_writing(self) -> None:
            """The client is not reading what we send: it must take some of it within
            `write_timeout_s`, and again within each `write_timeout_s` after, until it catches up."""
            super().pause_writing()
            if self._write_timer is None and bounds.write_timeout_s > 0:
                self._arm_write_timer()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

        def _await_headers(self, timeout_s: float = bounds.header_timeout_s) -> None:
            self._stop_header_timer()
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a pipelined request waits for this response; its bounds restart when it is sent
            if not self._header_bytes:  # nothing came: an idle connection, closed as keep-alive would be
                self._header_bytes = None
                self.transport.close()
                return
            self._refuse(
                OpenAIError(
                    "INVALID_ARGUMENT",
                    f"the request's headers did not arrive within {bounds.header_timeout_s:g} s",
                    code="request_timeout",
                    http_status=408,
                )
            )

        def _arm_write_timer(self) -> None:
            self._unsent_bytes = self.transport.get_write_buffer_size()
            self._write_timer = self.loop.call_later(bounds.write_timeout_s, self._writes_stalled)

        def _writes_stalled(self) -> None:
            """No byte taken for `write_timeout_s`: drop the connection, and its response (and the
            request behind it) ends as if the client had left, so a stream's blocks are freed.
            `abort`, not `close`: close would wait for the unread buffer to drain, and the
            connection would keep its slot. A slow reader that took something gets more time."""
            self._write_timer = None
            if self.transport.get_write_buffer_size() < self._unsent_bytes:
                self._arm_write_timer()
                return
            self.logger.warning("an HTTP client read nothing for %g s: connection dropped", bounds.write_timeout_s)
            self.transport.abort()

        def _refuse(self, error: OpenAIError) -> None:
            self._stop_header_timer()
            self._header_bytes = None
            if not self.transport.is_closing():
                self.transport.write(error.raw_http())
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refused (uvicorn's own answer is plain text)."""
            self._refuse(OpenAIError("INVALID_ARGUMENT", f"malformed HTTP request: {msg}", code="bad_http_request"))

    return BoundedProtocol


CLOSE = {"connection": "close"}  # a refused request's connection is not kept: its unread body stays unread


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
        too_large = OpenAIError(
            "INVALID_ARGUMENT",
            f"the request body is larger than {limit} bytes (max_request_bytes)",
            code="request_too_large",
            http_status=413,
            headers=CLOSE,
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return await too_large.response()(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.bounds.body_timeout_s)
        except _BodyTooLarge:
            return await too_large.response()(scope, receive, send)
        except asyncio.TimeoutError:
            error = OpenAIError(
                "INVALID_ARGUMENT",
                f"the request body did not arrive within {self.bounds.body_timeout_s:g} s",
                code="request_timeout",
                http_status=408,
                headers=CLOSE,
            )
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
