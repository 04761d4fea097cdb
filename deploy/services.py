"""The three services as `make run` starts them: module, port, settings, and how they find each
other. docker-compose.yml starts the same modules with the same settings (as env vars); a test
(tests/test_compose_file.py) checks that the two agree.

Settings are named by their config field (`kv_budget_tokens`); `environment()` turns them into
the service's variables (`COMPUTE_KV_BUDGET_TOKENS`) through common.settings.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from common.settings import env_name

# The env prefix of each service's settings (the configs' `env_prefix`: kept here as plain strings
# so that importing this module loads no service, and torch least of all).
ENV_PREFIXES = {"memory": "MEMORY", "compute": "COMPUTE", "gateway": "GATEWAY"}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    role: str  # memory | compute | gateway
    module: str  # run as `python -m <module>`
    port: int
    health_service: str
    settings: dict[str, str] = field(default_factory=dict)  # config field -> value, beyond host and port

    def environment(self, host: str) -> dict[str, str]:
        """The service's settings as its environment variables."""
        values = {"host": host, "port": str(self.port), **self.settings}
        return {env_name(ENV_PREFIXES[self.role], name): value for name, value in values.items()}


def local_services(
    memory_port: int = 50051,
    compute_ports: tuple[int, ...] = (50052,),
    gateway_port: int = 50050,
    gateway_metrics_port: int = 9100,
    memory_metrics_port: int = 9101,
    compute_settings: dict[str, str] | None = None,
    discovery: bool = True,
    gateway_settings: dict[str, str] | None = None,
    gateway_http_port: int = 8000,
    memory_http_port: int | None = None,
    internal_token_file: str = "",
) -> list[ServiceSpec]:
    """Memory, then one compute per port, then the gateway, all on loopback. With `discovery`
    the gateway learns the replicas from the memory service (as in compose); else it is given
    their addresses. The block map (`memory_http_port`) is on 9102 for the default stack (`make
    run`) and off for any other unless asked for: tests and benchmarks start stacks on free
    ports beside a running `make run`, and 9102 would collide. `internal_token_file`: the shared
    token every service checks and sends (common/grpc_auth.py); empty = none (loopback only)."""
    token = {"internal_token_file": internal_token_file} if internal_token_file else {}
    memory_address = f"127.0.0.1:{memory_port}"
    if memory_http_port is None:
        memory_http_port = 9102 if memory_port == 50051 else 0
    services = [
        ServiceSpec(
            "memory",
            "memory",
            "memory_service.server",
            memory_port,
            "rpc.internal.v1.MemoryService",
            {"metrics_port": str(memory_metrics_port), "http_port": str(memory_http_port), **token},
        )
    ]
    for i, port in enumerate(compute_ports):
        services.append(
            ServiceSpec(
                f"compute-{i}" if len(compute_ports) > 1 else "compute",
                "compute",
                "compute_service.server",
                port,
                "rpc.internal.v1.ComputeService",
                {"memory_address": memory_address, "replica": f"compute-{i}", **token, **(compute_settings or {})},
            )
        )
    services.append(
        ServiceSpec(
            "gateway",
            "gateway",
            "gateway.server",
            gateway_port,
            "rpc.v1.Gateway",
            {
                "compute_addresses": "" if discovery else ",".join(f"127.0.0.1:{p}" for p in compute_ports),
                "memory_address": memory_address,
                "metrics_port": str(gateway_metrics_port),
                "http_port": str(gateway_http_port),
                **token,
                **(gateway_settings or {}),
            },
        )
    )
    return services


def free_ports(n: int) -> list[int]:
    """n loopback ports free right now (for tests and benchmarks that start their own stack)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
