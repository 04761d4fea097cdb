"""Who may call a service: the one credential check of every gRPC listener, and the internal
services' shared token.

Public listener (the gateway): API keys (gateway/auth.py). Internal listeners (memory, compute,
and the memory service's block map page): one shared token read from a file
(`internal_token_file`, the same setting name on all three services); every caller sends it as
`authorization: Bearer <token>`, and the gateway and the compute replicas send it on every call of
their internal channels (`internal_channel`, `internal_sync_channel`). A call without it is
answered UNAUTHENTICATED before its body is parsed. Health and reflection stay open everywhere:
probes carry no credential and neither shows anything a caller could use.

Secure by default (`refuse_open_listener`): a service that would listen beyond loopback with no
credential configured refuses to start unless `allow_unauthenticated` says so.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path
from typing import Callable

import grpc

# gRPC methods that need no credential: health (probes) and reflection (grpcurl's discovery).
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MIN_TOKEN_CHARS = 32  # the generated token is 64 hex characters (256 bits)


def bearer(authorization: str | None) -> bytes:
    """The credential of an `authorization: Bearer <value>` header (b"" for any other scheme)."""
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip().encode() if scheme.lower() == "bearer" else b""


class RequireCredential(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED, before the body is parsed, for a call to a non-open method whose
    `authorization` metadata `allows` refuses."""

    def __init__(self, allows: Callable[[str | None], bool], message: str) -> None:
        self.allows, self.message = allows, message

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.allows(metadata.get("authorization")):
            return handler
        return _refusing(handler, self.message)


def _unread(body: bytes) -> None:
    """The deserializer of a refused call: the body is dropped unparsed."""
    return None


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED."""

    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler must be

    # The body is never parsed: an unauthenticated caller costs no deserializing (only the
    # receive limit's bytes, which grpc reads before any handler runs).
    codec = dict(request_deserializer=_unread, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)


# ---- the internal services' shared token ----


def read_token(path: str) -> str:
    """The token in `path` (surrounding whitespace dropped); ValueError naming the file if it is
    shorter than MIN_TOKEN_CHARS (an empty file must not mean "no check")."""
    token = Path(path).read_text().strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"internal_token_file {path}: the token must be at least {MIN_TOKEN_CHARS} characters")
    return token


def write_new_token(path: str, mode: int = 0o600) -> str:
    """A fresh random token in a new file at `path` (what `make run` and, before it starts,
    compose's memory service do). Created with `mode` from the start: never readable by others in between."""
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, mode)  # O_CREAT's mode is filtered by the umask
    return token


class TokenCheck:
    """Whether a call carries the internal token; a constant-time comparison of digests."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def allows(self, authorization: str | None) -> bool:
        return hmac.compare_digest(hashlib.sha256(bearer(authorization)).digest(), self._digest)


def internal_interceptors(token_file: str) -> tuple:
    """The server interceptors of an internal listener: the token check where a token file is
    configured, none otherwise."""
    if not token_file:
        return ()
    check = TokenCheck(read_token(token_file))
    message = "this internal service needs the internal token: metadata 'authorization: Bearer <token>'"
    return (RequireCredential(check.allows, message),)


class _ClientCallDetails(
    collections.namedtuple("_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    """The sync API's call details with our metadata (grpc offers no public constructor)."""


def _with_token(details, header: tuple[str, str], aio: bool):
    metadata = [*(details.metadata or ()), header]
    if aio:
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
    return _ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _AioTokenInterceptor:
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")


# grpc.aio files an interceptor under the first of the four kinds it is (an elif chain): one class a kind.
class _AioUnaryUnary(_AioTokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.header, True), request)


class _AioUnaryStream(_AioTokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.header, True), request)


class _AioStreamUnary(_AioTokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.header, True), request_iterator)


class _AioStreamStream(_AioTokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.header, True), request_iterator)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self.header, False), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self.header, False), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self.header, False), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self.header, False), request_iterator)


def internal_channel(address: str, token_file: str, options: list[tuple] | None = None) -> grpc.aio.Channel:
    """An asyncio channel to an internal service that sends the token (if one is configured) on
    every call."""
    if not token_file:
        return grpc.aio.insecure_channel(address, options=options)
    token = read_token(token_file)
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return grpc.aio.insecure_channel(address, options=options, interceptors=[kind(token) for kind in kinds])


def internal_sync_channel(address: str, token_file: str, options: list[tuple] | None = None) -> grpc.Channel:
    """The blocking-API twin of `internal_channel` (the compute engine's memory client)."""
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _SyncToken(read_token(token_file))) if token_file else channel


# ---- secure by default ----


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname, 0.0.0.0, ::, "": reachable from elsewhere


def refuse_open_listener(
    service: str, host: str, authenticated: bool, allow_unauthenticated: bool, how_to_authenticate: str
) -> None:
    """SystemExit, with what to do, if `service` would listen beyond loopback with no credential
    check and nobody said that was intended."""
    if authenticated or allow_unauthenticated or is_loopback(host):
        return
    raise SystemExit(
        f"{service}: refusing to listen on {host!r} with no authentication: anyone who can reach it could call it. "
        f"Configure {how_to_authenticate}, or pass --allow-unauthenticated true "
        f"(env {service.upper()}_ALLOW_UNAUTHENTICATED=true) if this network is trusted."
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m common.grpc_auth new-token PATH`: write a fresh token to PATH unless a token is
    there already (compose's memory service, before it starts: a restart keeps the token the others hold)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["new-token"])
    parser.add_argument("path")
    args = parser.parse_args(argv)
    if os.path.exists(args.path):
        read_token(args.path)  # a short or empty file is an error, not a token
        print(f"{args.path}: keeping the token there")
    else:
        write_new_token(args.path)
        print(f"{args.path}: wrote a new token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
