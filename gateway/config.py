"""GatewayConfig: every setting of the gateway, as CLI flags and `GATEWAY_*` environment variables
(common.settings)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class GatewayConfig:
    env_prefix: ClassVar[str] = "GATEWAY"
    host: str = "127.0.0.1"
    port: int = 50050
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off (the HTTP front serves /metrics too)
    http_port: int = 8000  # the OpenAI-compatible HTTP front (gateway/openai_api.py); 0 = off
    # API keys (gateway/auth.py): a file of one key a line, and/or a comma-separated list; none = open.
    api_keys_file: str = ""
    api_keys: str = ""
    # TLS for the gRPC and HTTP listeners (PEM files); empty = plaintext. Internal ports stay plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Empty = discover the replicas from the memory service (each advertises itself once SERVING);
    # else a static comma-separated list, or dns:///name:port (gateway/router.py).
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
    health_poll_s: float = 0.5  # how often each replica's grpc.health.v1 status is read
    replica_down_after_s: float = 2.0  # no health answer for this long = down: its streams move
    drain_timeout_s: float = 30.0  # on SIGTERM: how long in-flight streams may still finish
