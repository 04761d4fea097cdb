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

PAGE = resources.files("memory_service").joinpath("assets/block_map.html")


def _state(servicer) -> dict:
    return {"seq": servicer.events.seq,
            "pools": [servicer.snapshot(pool_id, pool) for pool_id, pool in list(servicer.registry.pools.items())]}


def create_app(servicer) -> Starlette:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(_state(servicer))

    async def events(request: Request) -> StreamingResponse:
        subscription = servicer.events.subscribe(1024)
        first = _state(servicer)  # taken with the subscription: no event falls between them

        async def stream():
            try:
                yield f"event: state\ndata: {json.dumps(first, separators=(',', ':'))}\n\n"
                while True:  # the events since the last message, as a JSON array
                    batch = await subscription.get(coalesce_s=0.02)  # at most 50 messages a second
                    yield f"data: {json.dumps(batch, separators=(',', ':'))}\n\n"
            finally:
                servicer.events.unsubscribe(subscription)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return Starlette(routes=[Route("/", page), Route("/state", state), Route("/events", events)])


async def start_block_map(servicer, host: str, port: int) -> HttpServer:
    return await start_http(create_app(servicer), host, port, graceful_timeout_s=1.0)
