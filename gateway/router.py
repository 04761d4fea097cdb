"""Which compute replica serves a request.

`compute_addresses` is a comma-separated list (`host1:50052,host2:50052`): each request goes to
the replica with the fewest requests in flight. A single `dns:///name:port` target is one
channel with gRPC's round_robin policy over every address the name resolves to (`docker compose
up --scale compute=N`).
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.grpc_server import CHANNEL_OPTIONS
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: compute_pb2_grpc.ComputeServiceStub
    in_flight: int = 0


class ReplicaRouter:
    def __init__(self, compute_addresses: str) -> None:
        addresses = [a.strip() for a in compute_addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("compute_addresses must name at least one compute replica")
        self.replicas = []
        for address in addresses:
            options = list(CHANNEL_OPTIONS)
            if address.startswith("dns:"):
                options.append(("grpc.lb_policy_name", "round_robin"))
            channel = grpc.aio.insecure_channel(address, options=options)
            self.replicas.append(Replica(address, channel, compute_pb2_grpc.ComputeServiceStub(channel)))

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        candidates = [r for r in self.replicas if r.address not in exclude]
        return min(candidates, key=lambda r: r.in_flight) if candidates else None

    async def info(self, timeout_s: float) -> compute_pb2.InfoResponse:
        """Model facts from the first replica that answers (waits for one to come up)."""
        last_error: Exception | None = None
        for replica in self.replicas:
            try:
                return await replica.stub.Info(compute_pb2.InfoRequest(), timeout=timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                last_error = exc
        raise RuntimeError(f"no compute replica answered: {last_error}")

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.channel.close()
