"""The live block map: an HTTP page (memory_service/assets/block_map.html, no build step, no CDN)
that draws every pool's blocks from the memory service's block events.

    GET /          the page
    GET /events    server-sent events: one `state` message (every pool's snapshot and the event
                   number it is at), then each step's block events as one JSON array
                   (a `missed` event if this client fell behind its bounded queue)
    GET /state     the same state as JSON, now
Served by uvicorn in the memory service's event loop on `http_port` (default 9102).
"""

from __future__ import annotations

import json
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from common.http_server import HttpServer, start_http
from memory_service.events import COALESCE_S

PAGE = resources.files("memory_service").joinpath("assets/block_map.html")


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

    async def events(request: Request) -> StreamingResponse:
        async def stream():
            subscription = servicer.events.subscribe()
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


async def start_block_map(servicer, host: str, port: int) -> HttpServer:
    """Serve the block map on host:port in this event loop (stopped with the service)."""
    return await start_http(create_app(servicer), host, port, graceful_timeout_s=1.0)
