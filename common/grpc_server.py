"""What every service's grpc.aio server has: health (grpc.health.v1), reflection, message limits
(large for the internal services, a public listener's own), and an interceptor that logs
unexpected exceptions once and answers INTERNAL with an error id."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import uuid
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _internal_error(method: str) -> str:
    """Log the exception being handled under a fresh id and return the caller's message: the id,
    never the exception's text (which may show internals)."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("%s failed (error id %s)", method, error_id)
    return f"internal error (id {error_id}; the server's log has the details)"


class _Undecodable:
    """What a request message that does not parse becomes (grpc's own answer would be INTERNAL)."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, but a body that does not parse becomes _Undecodable instead of an exception
    (which grpc would answer INTERNAL, as if the server had failed)."""
    if deserializer is None:
        return None

    def parse(body: bytes):
        try:
            return deserializer(body)
        except Exception:  # DecodeError, or any other failure to parse what a client sent
            return _Undecodable()

    return parse


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext, method: str) -> None:
    """End the call INVALID_ARGUMENT if its message did not parse."""
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message for {method}")


class _ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """An unexpected exception in a handler is a bug, not a client error: log it once and end the
    call INTERNAL with an error id (grpc's own answer would be UNKNOWN with the exception's text)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not (handler.unary_unary or handler.unary_stream):
            return handler
        method = handler_call_details.method
        codec = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._guarded_call(handler.unary_unary, method), **codec)
        inner_stream = handler.unary_stream
        if not inspect.isasyncgenfunction(inner_stream):  # it writes with context.write (health Watch)
            return grpc.unary_stream_rpc_method_handler(self._guarded_call(inner_stream, method), **codec)

        async def guarded_stream(request, context):
            await _refuse_undecodable(request, context, method)
            try:  # closed here, not by the garbage collector: a handler's `finally` (freeing blocks) runs now
                async with contextlib.aclosing(inner_stream(request, context)) as responses:
                    async for response in responses:
                        yield response
            except (grpc.RpcError, grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                await context.abort(grpc.StatusCode.INTERNAL, _internal_error(method))

        return grpc.unary_stream_rpc_method_handler(guarded_stream, **codec)

    @staticmethod
    def _guarded_call(inner, method: str):
        """A coroutine handler (a unary call, or a stream written with context.write), guarded."""

        async def guarded(request, context):
            await _refuse_undecodable(request, context, method)
            try:
                return await inner(request, context)
            except (grpc.RpcError, grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                await context.abort(grpc.StatusCode.INTERNAL, _internal_error(method))

        return guarded


def make_server(
    service_names: list[str], interceptors: tuple = (), options: list[tuple] | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with health (NOT_SERVING until `set_serving`) and reflection wired; the caller
    adds its services (and interceptors that run before the exception guard, such as auth).
    `options` replace the internal services' CHANNEL_OPTIONS (a public listener passes its own
    bounds: public_server_options)."""
    server = grpc.aio.server(
        interceptors=[*interceptors, _ExceptionInterceptor()], options=CHANNEL_OPTIONS if options is None else options
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


def public_server_options(
    max_receive_bytes: int, keepalive_time_s: float, min_client_ping_interval_s: float
) -> list[tuple]:
    """A public listener's bounds: a request message of at most `max_receive_bytes` (sized for the
    longest prompt, not the internal 64 MiB); the server pings an idle connection every
    `keepalive_time_s` and drops one that does not answer; a client pinging more often than
    `min_client_ping_interval_s` gets GOAWAY after two strikes (keepalive enforcement); a
    connection idle (no call) for 5 minutes is closed."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_connection_idle_ms", 300_000),  # a connection with no call for 5 minutes is closed
    ]


async def set_serving(
    health_servicer: health.aio.HealthServicer, service_names: list[str], serving: bool = True
) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health_servicer.set(name, status)


async def until_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT (a service then drains and exits 0)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def bind(server: grpc.aio.Server, host: str, port: int, tls_cert_file: str = "", tls_key_file: str = "") -> int:
    """Listen on host:port (port 0 picks a free one), with TLS when given a PEM certificate and key;
    returns the port."""
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    if tls_cert_file:
        with open(tls_key_file, "rb") as key, open(tls_cert_file, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    return bound
