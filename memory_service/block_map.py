"""The live block map: an HTTP page (memory_service/assets/block_map.html, no build step, no CDN)
that draws every pool's blocks from the memory service's block events.

    GET /          the page
    GET /events    server-sent events: one `state` message (every pool's snapshot and the event
                   number it is at), then each step's block events as one JSON array
                   (a `missed` event if this client fell behind its bounded queue)
    GET /state     the same state as JSON, now
Served by uvicorn in the memory service's event loop on `http_port` (default 9102).

With an internal token configured, every path needs it, as the gRPC port does: a script sends
`Authorization: Bearer <token>`; a browser opens `/?token=<token>` once, which sets an HttpOnly
cookie and redirects to `/` (the token leaves the address bar and the history).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from importlib import resources
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from starlette.routing import Route

from common.grpc_auth import TokenCheck, read_token
from common.http_server import HttpServer, start_http
from memory_service.events import COALESCE_S, TooManyWatchers

PAGE = resources.files("memory_service").joinpath("assets/block_map.html")
COOKIE = "block_map_token"


class _RequireToken:
    """ASGI middleware: 401 for a request with neither the token's header nor its cookie; the
    token in `/?token=` (a browser's first visit) becomes the cookie."""

    def __init__(self, app, token: str) -> None:
        # The cookie holds a value derived from the token, good for this page alone: browsers
        # send a host's cookies to every port on it, and the token itself opens the gRPC ports.
        self.cookie = hmac.new(token.encode(), b"block-map-cookie", hashlib.sha256).hexdigest()
        self.app, self.check, self.cookie_check = app, TokenCheck(token), TokenCheck(self.cookie)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.check.allows(request.headers.get("authorization")) or self.cookie_check.allows(
            f"Bearer {request.cookies.get(COOKIE, '')}"
        ):
            return await self.app(scope, receive, send)
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if scope["path"] == "/" and self.check.allows(f"Bearer {given}"):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict")
        else:
            response = PlainTextResponse(
                "the block map needs the internal token: open /?token=<the internal token file's contents>, "
                "or send 'Authorization: Bearer <token>'",
                status_code=401,
            )
        await response(scope, receive, send)


def _state(servicer) -> dict:
    return {
        "seq": servicer.events.seq,
        "pools": [servicer.snapshot(pool_id, pool) for pool_id, pool in list(servicer.registry.pools.items())],
    }


def create_app(servicer) -> Starlette:
    """The page, its state and its event stream, over the servicer's pools and events."""

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(_state(servicer))

    async def events(request: Request) -> StreamingResponse | PlainTextResponse:
        if servicer.events.watchers_full:  # the clean answer; a race past it ends the stream at once
            return PlainTextResponse(f"at most {servicer.events.max_watchers} event watchers", status_code=503)

        async def stream():
            try:
                subscription = servicer.events.subscribe()
            except TooManyWatchers:
                return
            first = _state(servicer)  # with the subscription, no await between: no event falls between them
            try:
                yield f"event: state\ndata: {json.dumps(first, separators=(',', ':'))}\n\n"
                while True:  # the events since the last message, as a JSON array (at most 50 a second)
                    batch = await subscription.get(coalesce_s=COALESCE_S)
                    yield f"data: {json.dumps(batch, separators=(',', ':'))}\n\n"
            finally:
                servicer.events.unsubscribe(subscription)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return Starlette(routes=[Route("/", page), Route("/state", state), Route("/events", events)])


async def start_block_map(servicer, host: str, port: int, token_file: str = "") -> HttpServer:
    """Serve the block map on host:port in this event loop (stopped with the service); with a
    token file, only to callers with the token."""
    app = create_app(servicer)
    if token_file:
        app = _RequireToken(app, read_token(token_file))
    return await start_http(app, host, port, graceful_timeout_s=1.0)
