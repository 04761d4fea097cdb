"""The three services as `make run` starts them: module, port settings, and how they find each
other. docker-compose.yml starts the same modules with the same settings (as env vars); a test
(tests/test_compose_file.py) checks that the two agree."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str  # run as `python -m <module>`
    port: int
    health_service: str
    env: dict[str, str] = field(default_factory=dict)  # settings beyond HOST/PORT


def local_services(memory_port: int = 50051, compute_ports: tuple[int, ...] = (50052,), gateway_port: int = 50050,
                   gateway_metrics_port: int = 9100, memory_metrics_port: int = 9101,
                   compute_env: dict[str, str] | None = None) -> list[ServiceSpec]:
    """Memory, then one compute per port, then the gateway, all on loopback."""
    memory_address = f"127.0.0.1:{memory_port}"
    services = [ServiceSpec("memory", "memory_service.server", memory_port, "rpc.v1.MemoryService",
                            {"METRICS_PORT": str(memory_metrics_port)})]
    for i, port in enumerate(compute_ports):
        services.append(ServiceSpec(f"compute-{i}" if len(compute_ports) > 1 else "compute", "compute_service.server",
                                    port, "rpc.v1.ComputeService",
                                    {"MEMORY_ADDRESS": memory_address, "REPLICA": f"compute-{i}", **(compute_env or {})}))
    services.append(ServiceSpec("gateway", "gateway.server", gateway_port, "rpc.v1.Gateway", {
        "COMPUTE_ADDRESSES": ",".join(f"127.0.0.1:{p}" for p in compute_ports),
        "MEMORY_ADDRESS": memory_address, "METRICS_PORT": str(gateway_metrics_port),
    }))
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
