"""uvicorn inside a service's own event loop, beside its gRPC server: the gateway's OpenAI API and
the memory service's block map. The service handles SIGTERM/SIGINT itself (and drains), so
uvicorn must not take the signals over."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, server: _Server, task: asyncio.Task) -> None:
        self._server, self._task = server, task

    def stop_accepting(self) -> None:
        """Stop taking connections; open responses get the graceful timeout."""
        self._server.should_exit = True

    async def stop(self) -> None:
        self.stop_accepting()
        await self._task


async def start_http(
    app,
    host: str,
    port: int,
    tls_cert_file: str = "",
    tls_key_file: str = "",
    graceful_timeout_s: float | None = None,
    http_protocol: type | None = None,
    keepalive_s: float = 5.0,
) -> HttpServer:
    """Serve `app`; listening once this returns (RuntimeError if it cannot). `http_protocol`
    replaces uvicorn's own (the gateway's adds its bounds: gateway/http_bounds.py)."""
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=tls_cert_file or None,
            ssl_keyfile=tls_key_file or None,
            timeout_graceful_shutdown=graceful_timeout_s,
            http=http_protocol or "auto",
            timeout_keep_alive=keepalive_s,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            raise RuntimeError(f"cannot serve HTTP on {host}:{port}")
        await asyncio.sleep(0.01)
    return HttpServer(server, task)
