"""API keys for the gateway's public listeners: one check, used by the gRPC interceptor and the
HTTP front alike.

Keys come from `api_keys_file` (one key a line; blank lines and `#` comments skipped) and the
comma-separated `api_keys` setting (`GATEWAY_API_KEYS`). No keys = open, as before. A client
sends `authorization: Bearer <key>` (gRPC metadata or HTTP header, as OpenAI's clients do).
Health checks and Prometheus metrics stay open: load balancers
and scrapers carry no keys, and neither shows a prompt or a token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
from pathlib import Path

import grpc

# gRPC methods that need no key: health (probes) and reflection (grpcurl's discovery).
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_keys(keys_file: str = "", keys: str = "") -> list[str]:
    """The configured keys in order: the comma-separated setting's, then the file's."""
    found = [k.strip() for k in keys.split(",") if k.strip()]
    if keys_file:
        lines = Path(keys_file).read_text().splitlines()
        found += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return found


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def load(cls, keys_file: str = "", keys: str = "") -> "ApiKeys":
        return cls(read_keys(keys_file, keys))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether a request with this `authorization` header may pass (always, with no keys
        configured). Constant-time comparison against every key."""
        if not self._digests:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        given = hashlib.sha256(value.strip().encode() if scheme.lower() == "bearer" else b"").digest()
        found = False
        for digest in self._digests:  # every key, equal-length digests: the time tells nothing about any key
            found |= hmac.compare_digest(given, digest)
        return found


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call to a keyed method without a valid key."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.keys.allows(metadata.get("authorization")):
            return handler
        return _refusing(handler)


def _unread(body: bytes) -> None:
    """The deserializer of a refused call: the body is dropped unparsed."""
    return None


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED."""
    message = "missing or invalid API key: send metadata 'authorization: Bearer <key>'"

    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler must be

    # The body is never parsed: an unauthenticated caller costs no deserializing (only the public
    # receive limit's bytes, which grpc reads before any handler runs).
    codec = dict(request_deserializer=_unread, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)


class GrpcCallLimits(grpc.aio.ServerInterceptor):
    """At most `max_calls` keyed calls (Generate, Abort, stats) in flight, and apart from them at
    most `max_open_streams` open streaming calls (health `Watch`, reflection); past either,
    RESOURCE_EXHAUSTED at once. Open unary calls (health `Check`: what probes send) are never
    counted: they end at once, and no pile of open streams may refuse a probe. Separate counts,
    not grpc's one `maximum_concurrent_rpcs`, so that streams anyone may open cannot take the
    slots of the clients that hold a key. Placed after the key check: an unauthenticated call
    takes no slot."""

    def __init__(self, max_calls: int, max_open_streams: int = 256) -> None:
        self._limits = {False: max_calls, True: max_open_streams}
        self._in_flight = {False: 0, True: 0}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        is_open = handler_call_details.method.startswith(OPEN_GRPC_PREFIXES)
        codec = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            if is_open:
                return handler
            return grpc.unary_unary_rpc_method_handler(self._limited_call(handler.unary_unary, is_open), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._limited_call(handler.stream_unary, is_open), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._limited_stream(handler.unary_stream, is_open), **codec)
        return grpc.stream_stream_rpc_method_handler(self._limited_stream(handler.stream_stream, is_open), **codec)

    def _limited_call(self, inner, is_open: bool):
        async def limited(request, context):
            await self._enter(is_open, context)
            try:
                return await inner(request, context)
            finally:
                self._in_flight[is_open] -= 1

        return limited

    def _limited_stream(self, inner, is_open: bool):
        if not inspect.isasyncgenfunction(inner):  # a handler that writes with context.write (health Watch)
            return self._limited_call(inner, is_open)

        async def limited(request, context):
            await self._enter(is_open, context)
            try:
                async with contextlib.aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                self._in_flight[is_open] -= 1

        return limited

    async def _enter(self, is_open: bool, context: grpc.aio.ServicerContext) -> None:
        if self._in_flight[is_open] >= self._limits[is_open]:
            kind = "open streaming calls" if is_open else "calls"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway runs its maximum of {self._limits[is_open]} {kind} at once; retry later",
            )
        self._in_flight[is_open] += 1
