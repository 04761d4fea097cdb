"""Which compute replica serves a request, and which replicas can.

`compute_addresses` is a comma-separated list (`host1:50052,host2:50052`): each request goes to
the SERVING replica with the fewest requests in flight. A single `dns:///name:port` target is one
channel with gRPC's round_robin policy over every address the name resolves to (`docker compose
up --scale compute=N`).

Each listed replica is watched: its `grpc.health.v1` status is polled every `poll_s`. A replica
that answers NOT_SERVING (draining, or its memory service is unreachable) gets no new requests;
one that does not answer for `down_after_s` is down: the gateway continues its streams elsewhere
(`on_down`). A dns:/// target is one channel over many backends, so its health checks would land
on any of them: it is not watched, and its failures show as broken streams instead.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_server import CHANNEL_OPTIONS
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc

log = logging.getLogger("gateway.router")
COMPUTE_SERVICE = "rpc.internal.v1.ComputeService"


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: compute_pb2_grpc.ComputeServiceStub
    watched: bool
    in_flight: int = 0
    serving: bool = True  # until the first health answer says otherwise
    last_answer: float = field(default_factory=time.monotonic)


class ReplicaRouter:
    def __init__(self, compute_addresses: str, poll_s: float = 0.5, down_after_s: float = 2.0) -> None:
        addresses = [a.strip() for a in compute_addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("compute_addresses must name at least one compute replica")
        self.poll_s, self.down_after_s = poll_s, down_after_s
        self.replicas: list[Replica] = []
        for address in addresses:
            options = list(CHANNEL_OPTIONS)
            if address.startswith("dns:"):
                options.append(("grpc.lb_policy_name", "round_robin"))
            channel = grpc.aio.insecure_channel(address, options=options)
            self.replicas.append(Replica(address, channel, compute_pb2_grpc.ComputeServiceStub(channel),
                                         watched=not address.startswith("dns:")))
        self._watchers: list[asyncio.Task] = []

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        """The least loaded SERVING replica not in `exclude` (None if there is none now)."""
        candidates = [r for r in self.replicas if r.serving and r.address not in exclude]
        return min(candidates, key=lambda r: r.in_flight) if candidates else None

    def suspect(self, replica: Replica) -> None:
        """A call to it just failed: route nothing more to it until its health check says
        SERVING again (a dns:/// target is never watched, so it is never benched)."""
        if replica.watched:
            replica.serving = False

    async def info(self, timeout_s: float) -> compute_pb2.InfoResponse:
        """Model facts from the first replica that answers (waits for one to come up)."""
        last_error: Exception | None = None
        for replica in self.replicas:
            try:
                return await replica.stub.Info(compute_pb2.InfoRequest(), timeout=timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                last_error = exc
        raise RuntimeError(f"no compute replica answered: {last_error}")

    def start_watching(self, on_down: Callable[[Replica], None]) -> None:
        """Poll every watched replica's health in the background; `on_down(replica)` runs when one
        stops answering."""
        self._watchers = [asyncio.create_task(self._watch(r, on_down)) for r in self.replicas if r.watched]

    async def _watch(self, replica: Replica, on_down: Callable[[Replica], None]) -> None:
        stub = health_pb2_grpc.HealthStub(replica.channel)
        request = health_pb2.HealthCheckRequest(service=COMPUTE_SERVICE)
        down = False
        while True:
            try:
                reply = await stub.Check(request, timeout=max(self.poll_s, 0.5))
                replica.last_answer = time.monotonic()
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                if serving != replica.serving or down:
                    log.info("compute replica %s is %s", replica.address, "SERVING" if serving else "NOT_SERVING")
                replica.serving, down = serving, False
            except grpc.aio.AioRpcError:
                replica.serving = False
                if not down and time.monotonic() - replica.last_answer >= self.down_after_s:
                    down = True
                    log.warning("compute replica %s is down (no health answer for %.1f s)", replica.address,
                                time.monotonic() - replica.last_answer)
                    on_down(replica)
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        for replica in self.replicas:
            await replica.channel.close()
