"""API keys for the gateway's public listeners, and the tenant each key belongs to: one check, used by
the gRPC interceptor and the HTTP front alike.

Keys come from `api_keys_file` and the comma-separated `api_keys` setting (`GATEWAY_API_KEYS`). Each
entry (a line of the file, an item of the list) is `<key> <tenant>`; a key alone is its own tenant
(the old one-key-a-line files load unchanged): named from the key's SHA-256 inside the gateway
(stable across restarts and gateways, so its cache namespace is too), shown in metrics as `key-<n>`,
its place among the unnamed keys, so nothing derived from a key is ever published. Blank lines and
`#` comments are skipped. A tenant is the unit of isolation: its own prefix-cache namespace, request
ids, limits and metrics (gateway/tenant_limits.py). No keys = no authentication and one tenant, ""
(allowed only on loopback unless `allow_unauthenticated`). A client sends `authorization: Bearer
<key>` (gRPC metadata or HTTP header, as OpenAI's clients do).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.grpc_auth import OPEN_GRPC_PREFIXES, RequireCredential, bearer

TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send metadata 'authorization: Bearer <key>'"


@dataclass(frozen=True)
class ApiKey:
    key: str
    tenant: str  # the unit of isolation (cache namespace, request ids, limits)
    label: str  # what metrics call it: the tenant's name, or key-<n> for a key alone


def parse_key_entry(entry: str, where: str, unnamed: int) -> ApiKey:
    """One `<key> [<tenant>]` entry (`unnamed`: how many keys alone came before it); ValueError
    naming `where` (never the key) if malformed."""
    parts = entry.split()
    if len(parts) > 2:
        raise ValueError(f"{where}: expected '<key> <tenant>', found {len(parts)} fields")
    key = parts[0]
    if len(parts) == 1:  # ':' keeps it apart from every name a file can give (TENANT_NAME has none)
        return ApiKey(key, "key:" + hashlib.sha256(key.encode()).hexdigest()[:32], f"key-{unnamed + 1}")
    if not TENANT_NAME.fullmatch(parts[1]):
        raise ValueError(f"{where}: a tenant name is 1-64 of A-Z a-z 0-9 . _ -")
    return ApiKey(key, parts[1], parts[1])


def read_keys(keys_file: str = "", keys: str = "") -> list[ApiKey]:
    """The configured keys in order: the comma-separated setting's, then the file's. ValueError
    for a malformed entry or a key given twice."""
    entries = [(k, f"api_keys item {i + 1}") for i, k in enumerate(keys.split(",")) if k.strip()]
    if keys_file:
        lines = enumerate(Path(keys_file).read_text().splitlines(), 1)
        entries += [(line, f"{keys_file} line {n}") for n, line in lines if line.strip() and line.strip()[0] != "#"]
    found: list[ApiKey] = []
    for entry, where in entries:
        found.append(parse_key_entry(entry, where, sum(k.tenant.startswith("key:") for k in found)))
    if len({k.key for k in found}) != len(found):
        raise ValueError("an API key is configured twice")
    return found


class ApiKeys:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._digests = [(hashlib.sha256(k.key.encode()).digest(), k.tenant) for k in keys]
        self.labels = {k.tenant: k.label for k in keys}  # tenant -> its name in metrics

    @classmethod
    def load(cls, keys_file: str = "", keys: str = "") -> "ApiKeys":
        return cls(read_keys(keys_file, keys))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._digests}

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of the key in this `authorization` header; None if it is no key of ours.
        "" with no keys configured (everyone is the one anonymous tenant). Constant time: every
        key's digest is compared, equal lengths, no early exit, so timing tells nothing about any key."""
        if not self._digests:
            return ""
        given = hashlib.sha256(bearer(authorization)).digest()
        found = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(given, digest):
                found = tenant
        return found

    def allows(self, authorization: str | None) -> bool:
        return self.tenant(authorization) is not None

    def interceptor(self) -> RequireCredential:
        """UNAUTHENTICATED for a call to a keyed method without a valid key."""
        return RequireCredential(self.allows, UNAUTHENTICATED_MESSAGE)


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
