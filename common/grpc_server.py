"""What every service's grpc.aio server has: health (grpc.health.v1), reflection, large message
limits, and an interceptor that logs unexpected exceptions once and answers INTERNAL."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class _ExceptionInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streams handle their own errors (they must send a final message)
        inner = handler.unary_unary

        async def guarded(request, context):
            try:
                return await inner(request, context)
            except (grpc.RpcError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # a bug, not a client error: log once, answer INTERNAL
                log.exception("%s failed", handler_call_details.method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def make_server(service_names: list[str], interceptors: tuple = ()) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with health (NOT_SERVING until `set_serving`) and reflection wired; the caller
    adds its services (and interceptors that run before the exception guard, such as auth)."""
    server = grpc.aio.server(interceptors=[*interceptors, _ExceptionInterceptor()], options=CHANNEL_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: list[str],
                      serving: bool = True) -> None:
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
