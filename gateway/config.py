"""GatewayConfig: every setting of the gateway, as CLI flags and `GATEWAY_*` environment variables
(common.settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.structured_output import GrammarSettings


@dataclass
class GatewayConfig(GrammarSettings):
    env_prefix: ClassVar[str] = "GATEWAY"
    host: str = "127.0.0.1"
    port: int = 50050
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off (the HTTP front serves /metrics too, without API keys only)
    http_port: int = 8000  # the OpenAI-compatible HTTP front (gateway/openai_api.py); 0 = off
    # API keys (gateway/auth.py): a file of `<key> <tenant>` lines, and/or a comma-separated list
    # of such entries. None = open, which a gateway listening beyond loopback refuses unless
    # allow_unauthenticated says the network is trusted.
    api_keys_file: str = ""
    api_keys: str = ""
    allow_unauthenticated: bool = False
    # Where clients reach the gateway, when that is not its listen host: compose listens on 0.0.0.0
    # inside the container and publishes on this host address. The secure-by-default check uses it.
    exposed_host: str = ""
    # Per-tenant limits (gateway/tenant_limits.py); 0 = off. Over one: RESOURCE_EXHAUSTED / 429 with a retry hint.
    tenant_max_in_flight: int = 0  # a tenant's requests at once
    tenant_tokens_per_minute: int = 0  # prompt + n x max_new_tokens charged at admission, the unused part refunded
    # The internal services' shared token (common/grpc_auth.py), sent on every call to memory and compute.
    internal_token_file: str = ""
    # TLS for the gRPC and HTTP listeners (PEM files); empty = plaintext. Internal ports stay plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Empty = discover the replicas from the memory service (each advertises itself once SERVING);
    # else a static comma-separated list, or dns:///name:port (gateway/replica_set.py).
    compute_addresses: str = ""
    memory_address: str = "127.0.0.1:50051"  # discovery, kv-aware matching, GetStats; empty = none
    routing: str = "kv-aware"  # kv-aware | least-loaded | round-robin (gateway/routing.py)
    kv_overlap_weight: float = 2.0  # kv-aware: weight of a request's uncached blocks against load; 0 = load only
    match_timeout_s: float = 0.25  # kv-aware: a slower Match is dropped and the request routed on load alone
    discovery_poll_s: float = 0.5  # how often the memory service's list of replicas is read
    max_in_flight: int = 512  # more concurrent requests get RESOURCE_EXHAUSTED
    startup_timeout_s: float = 600.0
    replica_wait_s: float = 30.0  # how long a request waits for a SERVING replica before UNAVAILABLE
    max_migrations: int = 8  # times one request may be continued on another replica after faults
    max_replica_deaths: int = 2  # a request whose replicas died under it this often is failed (query of death)
    health_poll_s: float = 0.5  # how often each replica's grpc.health.v1 status is read
    replica_down_after_s: float = 2.0  # no health answer for this long = down: its streams move
    drain_timeout_s: float = 30.0  # on SIGTERM: how long in-flight streams may still finish
    # Bounds on what a client can make the gateway hold or do (docs/operations.md, "Isolation and
    # bounds"); each is applied before the work it bounds.
    max_request_s: float = 600.0  # a request's whole duration (both fronts; a shorter client deadline wins)
    max_request_bytes: int = 1 << 20  # an HTTP body, and a public gRPC message (a 1024-token text is <= 128 KiB)
    max_concurrent_rpcs: int = 1024  # public gRPC calls at once (streams included); more: RESOURCE_EXHAUSTED
    http_max_connections: int = 1024  # open HTTP connections; more are answered 429 and closed
    http_header_timeout_s: float = 10.0  # a request's headers must arrive within this
    http_body_timeout_s: float = 30.0  # and its body within this
    http_keepalive_s: float = 5.0  # an idle keep-alive connection is closed after this
    stream_write_timeout_s: float = 30.0  # a stream whose client reads nothing for this long is ended (blocks freed)
    grpc_keepalive_s: float = 60.0  # the gateway pings an idle client connection this often (dead peers found)
    grpc_min_client_ping_s: float = 10.0  # clients pinging more often than this are disconnected
