"""Which compute replicas exist, which of them are serving, and what this gateway has sent each:
the gateway's replica set. It alone changes a replica's counters (requests in flight, routed
prompt blocks, pending prefill, totals); gateway.routing chooses among the serving ones.

Two ways to know the replicas:
- **Discovery** (`compute_addresses` empty, the default): every compute replica tells the memory
  service the address it serves on once it is SERVING, under its pool's lease. The gateway polls
  the memory service (`ListReplicas`) every `discovery_poll_s`: a new replica is routed to
  from its first SERVING health answer after the poll that lists it, one whose lease ran out (or
  that withdrew while draining) leaves. Scaling needs no gateway restart and no DNS. While the
  memory service does not answer, the set stays as it was (its replicas are NOT_SERVING then
  anyway); after it restarts (a new epoch) nobody leaves for one lease, the time the replicas
  take to register again.
- **A static list** (`host1:50052,host2:50052`) for tests and simple setups; a single
  `dns:///name:port` target is one channel with gRPC's round_robin policy over every address the
  name resolves to (no health watch: its failures show as broken streams).

Each replica is watched: its `grpc.health.v1` status is polled every `poll_s`. A replica that
answers NOT_SERVING (draining, or its memory service is unreachable) gets no new requests; one
that does not answer for `down_after_s` is down: the gateway continues its streams elsewhere
(`on_down`). A replica that leaves the discovered set while requests still run on it (its lease
ran out while it was paused, not dead) is retired: no new requests, watched until they end.
Which serving replica a request goes to is gateway.routing's choice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_auth import internal_channel
from common.grpc_server import CHANNEL_OPTIONS
from gateway.metrics import CACHED_TOKENS, HIT_RATE, MATCHED_TOKENS, PROMPT_TOKENS, forget_replica
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc, memory_pb2, memory_pb2_grpc

log = logging.getLogger("gateway.replica_set")
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
    # What this gateway has routed here and not seen finish (gateway.routing keeps these).
    routed_blocks: dict[bytes, int] = field(default_factory=dict)  # prompt block hash -> requests holding it
    pending_prefill_blocks: int = 0  # blocks of routed prompts not prefilled yet (no first token)
    # Totals for GetStats and the per-replica hit rate.
    requests_routed: int = 0
    prompt_tokens: int = 0
    matched_tokens: int = 0
    cached_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens its prefix cache had / prompt tokens it served (this gateway's requests)."""
        return self.cached_tokens / max(self.prompt_tokens, 1)

    def take(self, block_hashes: list[bytes], prefill_blocks: int) -> None:
        """An attempt is routed here: its prompt's blocks count as held here, its prefill as queued."""
        self.in_flight += 1
        self.requests_routed += 1
        self.pending_prefill_blocks += prefill_blocks
        for h in block_hashes:
            self.routed_blocks[h] = self.routed_blocks.get(h, 0) + 1

    def prefilled(self, prefill_blocks: int) -> None:
        """An attempt's first token arrived: its prefill left the queue."""
        self.pending_prefill_blocks -= prefill_blocks

    def count_prompt(self, prompt_tokens: int, matched_tokens: int, cached_tokens: int) -> None:
        """An attempt's first Complete: prompt tokens served here, how many routing saw held here,
        how many its prefix cache had (the per-replica hit rate)."""
        self.prompt_tokens += prompt_tokens
        self.matched_tokens += matched_tokens
        self.cached_tokens += cached_tokens
        PROMPT_TOKENS.labels(self.address).inc(prompt_tokens)
        MATCHED_TOKENS.labels(self.address).inc(matched_tokens)
        CACHED_TOKENS.labels(self.address).inc(cached_tokens)
        HIT_RATE.labels(self.address).set(self.prefix_hit_rate)

    def release(self, block_hashes: list[bytes]) -> None:
        """An attempt ended (finished, failed or cancelled): it holds nothing here any more."""
        self.in_flight -= 1
        for h in block_hashes:
            left = self.routed_blocks[h] - 1
            if left:
                self.routed_blocks[h] = left
            else:
                del self.routed_blocks[h]


class ReplicaSet:
    def __init__(
        self,
        compute_addresses: str,
        memory: memory_pb2_grpc.MemoryServiceStub | None = None,
        poll_s: float = 0.5,
        down_after_s: float = 2.0,
        discovery_poll_s: float = 0.5,
        internal_token_file: str = "",
    ) -> None:
        addresses = [a.strip() for a in compute_addresses.split(",") if a.strip()]
        if not addresses and memory is None:
            raise ValueError("compute_addresses is empty and there is no memory_address to discover replicas from")
        self.discovered = not addresses
        self.memory = memory
        self.poll_s, self.down_after_s, self.discovery_poll_s = poll_s, down_after_s, discovery_poll_s
        self.internal_token_file = internal_token_file  # sent on every call to a replica
        self.replicas: list[Replica] = []  # the routable set
        self._retired: dict[str, Replica] = {}  # left the discovered set with requests still running
        self._watchers: dict[str, asyncio.Task] = {}
        self._on_down: Callable[[Replica], None] | None = None
        self._discovery: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # channels of forgotten replicas, closing
        self._epoch, self._keep_until = "", 0.0  # the memory instance; after it changes, nobody leaves until then
        for address in addresses:
            self._add(address)

    def _add(self, address: str, serving: bool = True) -> Replica:
        # Its own subchannels: a replica that joins at the address of one that died must not
        # inherit that one's connection backoff from gRPC's process-wide pool (seconds of refusals).
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if address.startswith("dns:"):
            options.append(("grpc.lb_policy_name", "round_robin"))
        channel = internal_channel(address, self.internal_token_file, options)
        replica = Replica(
            address,
            channel,
            compute_pb2_grpc.ComputeServiceStub(channel),
            watched=not address.startswith("dns:"),
            serving=serving,
        )
        self.replicas.append(replica)
        if self._on_down is not None:  # started: watch it from now on
            self._start_watching(replica)
        return replica

    def candidates(self, exclude: set[str] = frozenset()) -> list[Replica]:
        """SERVING replicas not in `exclude`, in a stable order (by address)."""
        return sorted((r for r in self.replicas if r.serving and r.address not in exclude), key=lambda r: r.address)

    def suspect(self, replica: Replica) -> None:
        """A call to it just failed: route nothing more to it until its health check says
        SERVING again (a dns:/// target is never watched, so it is never benched)."""
        if replica.watched:
            replica.serving = False

    def start(self, on_down: Callable[[Replica], None]) -> None:
        """Poll every watched replica's health in the background (`on_down(replica)` runs when
        one stops answering) and, with discovery, the memory service's list of replicas."""
        self._on_down = on_down
        for replica in self.replicas:
            self._start_watching(replica)
        if self.discovered:
            self._discovery = asyncio.create_task(self._discover_forever())

    async def info(self, timeout_s: float) -> compute_pb2.InfoResponse:
        """Model facts from the first replica that answers (waits for one to be discovered and up)."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while True:
            for replica in list(self.replicas):
                try:
                    return await replica.stub.Info(
                        compute_pb2.InfoRequest(),
                        wait_for_ready=True,
                        timeout=max(0.1, min(5.0, deadline - time.monotonic())),
                    )
                except grpc.aio.AioRpcError as exc:
                    last_error = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no compute replica answered: {last_error or 'none was discovered'}")
            await asyncio.sleep(0.1)

    def update(self, addresses: list[str], epoch: str = "", lease_ttl_s: float = 0.0) -> None:
        """Make the routable set the discovered `addresses`: add new ones (routed to from their
        first SERVING health answer), retire the missing, unless the memory service has just
        restarted (a new `epoch`): then its list fills up as the replicas register again, and
        nobody leaves for `lease_ttl_s`."""
        if epoch != self._epoch:
            if self._epoch:
                log.info(
                    "memory service restarted (epoch %s -> %s): no replica leaves for %.1f s",
                    self._epoch,
                    epoch,
                    lease_ttl_s + self.discovery_poll_s,
                )
                self._keep_until = time.monotonic() + lease_ttl_s + self.discovery_poll_s
            self._epoch = epoch
        listed = set(addresses)
        leaving = [] if time.monotonic() < self._keep_until else [r for r in self.replicas if r.address not in listed]
        for replica in leaving:
            self.replicas.remove(replica)
            self._retired[replica.address] = replica
            log.info("compute replica %s left (lease ended or withdrawn)", replica.address)
        for address in addresses:
            if any(r.address == address for r in self.replicas):
                continue
            replica = self._retired.pop(address, None)
            if replica is not None:  # came back before its requests ended
                self.replicas.append(replica)
            else:
                self._add(address, serving=False)
            log.info("compute replica %s joined", address)
        for address, replica in list(self._retired.items()):
            if replica.in_flight == 0:  # nothing runs there any more: forget it
                del self._retired[address]
                self._stop_watching(address)
                forget_replica(address)
                task = asyncio.create_task(replica.channel.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _discover_forever(self) -> None:
        while True:
            try:
                reply = await self.memory.ListReplicas(
                    memory_pb2.ListReplicasRequest(), timeout=max(self.discovery_poll_s, 1.0)
                )
                self.update([r.address for r in reply.replicas], reply.epoch, reply.lease_ttl_s)
            except grpc.aio.AioRpcError as exc:  # keep the set as it is until the memory service answers
                level = logging.WARNING if exc.code() == grpc.StatusCode.UNIMPLEMENTED else logging.DEBUG
                log.log(level, "discovery: the memory service did not answer ListReplicas (%s)", exc.code().name)
            except Exception:  # a bug here must not end discovery for good
                log.exception("discovery poll failed")
            await asyncio.sleep(self.discovery_poll_s)

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
                    log.warning(
                        "compute replica %s is down (no health answer for %.1f s)",
                        replica.address,
                        time.monotonic() - replica.last_answer,
                    )
                    on_down(replica)
            await asyncio.sleep(self.poll_s)

    def _start_watching(self, replica: Replica) -> None:
        if replica.watched:
            self._watchers[replica.address] = asyncio.create_task(self._watch(replica, self._on_down))

    def _stop_watching(self, address: str) -> None:
        task = self._watchers.pop(address, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        for address in list(self._watchers):
            self._stop_watching(address)
        for replica in [*self.replicas, *self._retired.values()]:
            await replica.channel.close()
