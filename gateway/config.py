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
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off
    compute_addresses: str = "127.0.0.1:50052"  # comma-separated, or dns:///name:port
    memory_address: str = "127.0.0.1:50051"  # for GetStats; empty = none
    max_in_flight: int = 512  # more concurrent requests get RESOURCE_EXHAUSTED
    startup_timeout_s: float = 600.0
