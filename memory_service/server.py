"""The memory service: one BlockAllocator per registered compute pool, each under a lease
(memory_service.pools), served over gRPC.

The servicer only translates protobuf <-> memory_service objects; a background task expires
pools whose lease ran out. Run it with `python -m memory_service.server` (flags/env:
MemoryServiceConfig).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import ClassVar

import grpc
from prometheus_client import start_http_server

from common.grpc_auth import internal_interceptors, refuse_open_listener
from common.grpc_server import bind, make_server, set_serving, until_stop_signal
from common.settings import parse_config
from memory_service.block_allocator import BlockAllocatorError
from memory_service.block_events import Watching
from memory_service.block_map import start_block_map
from memory_service.contract import stats_to_proto, step_request_from_proto, step_response_to_proto
from memory_service.events import (
    COALESCE_S,
    MAX_QUEUE_BATCHES,
    MAX_WATCHERS,
    QUEUE_BATCHES,
    EventRecorder,
    TooManyWatchers,
    marker,
)
from memory_service.metrics import EXPIRED, export_pool, unexport_pool
from memory_service.pools import (
    FencedPoolError,
    Pool,
    PoolLimitError,
    PoolLimits,
    PoolRegistry,
    ReplicaMatch,
    UnknownPoolError,
)
from memory_service.step import apply_step
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger("memory_service")
SERVICE = "rpc.internal.v1.MemoryService"


@dataclass
class MemoryServiceConfig:
    env_prefix: ClassVar[str] = "MEMORY"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9101  # 0 = no Prometheus endpoint
    lease_ttl_s: float = 5.0  # a pool not heard from for this long is freed and fenced
    http_port: int = 9102  # the live block map page and its event stream (memory_service/block_map.py); 0 = off
    event_log: str = ""  # append every block event to this JSON-lines file (continued across restarts)
    event_ring_size: int = 65536  # recent events kept in memory
    block_events: bool = True  # off: no events, no block map (bench/events_overhead.py compares)
    # Who may call (common/grpc_auth.py): the shared token's file, for gRPC and the block map page
    # alike. None: anyone, which a service listening beyond loopback refuses unless allowed.
    internal_token_file: str = ""
    allow_unauthenticated: bool = False
    # What a caller can make it hold (memory_service/pools.py, PoolLimits; events.py).
    max_pool_blocks: int = PoolLimits.max_pool_blocks
    max_pools: int = PoolLimits.max_pools
    max_pools_per_replica: int = PoolLimits.max_pools_per_replica
    max_total_blocks: int = PoolLimits.max_total_blocks
    max_watchers: int = MAX_WATCHERS  # WatchEvents streams and block map pages at once; more: RESOURCE_EXHAUSTED / 503
    max_watcher_queue: int = MAX_QUEUE_BATCHES  # event batches one watcher may have queued (it may ask for fewer)

    def pool_limits(self) -> PoolLimits:
        return PoolLimits(
            self.max_pool_blocks,
            PoolLimits.max_block_size,
            self.max_pools,
            self.max_pools_per_replica,
            self.max_total_blocks,
        )


def replica_match_to_proto(m: ReplicaMatch) -> memory_pb2.ReplicaMatch:
    st = m.pool.allocator.stats()
    return memory_pb2.ReplicaMatch(
        pool_id=m.pool_id,
        replica=m.pool.replica,
        address=m.pool.address,
        matched_blocks=m.matched_blocks,
        block_size=st.block_size,
        num_blocks=st.num_blocks,
        num_free_blocks=st.num_free_blocks,
        num_used_blocks=st.num_used_blocks,
        num_running=st.num_sequences,
        num_waiting=m.pool.num_waiting,
        num_cached_blocks=st.num_cached_blocks,
    )


def events_message(events: list[dict]) -> memory_pb2.BlockEvents:
    """Events as WatchEvents sends them: one JSON array, serialized once per message."""
    return memory_pb2.BlockEvents(json=json.dumps(events, separators=(",", ":")))


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(
        self, registry: PoolRegistry, events: EventRecorder | None = None, max_watcher_queue: int = MAX_QUEUE_BATCHES
    ) -> None:
        self.registry = registry
        self.events = events  # None: block events are off
        self.max_watcher_queue = max_watcher_queue

    async def RegisterPool(self, request, context):
        if request.num_blocks == 0 or request.block_size == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_blocks and block_size must be > 0")
        try:
            pool_id = self.registry.register(request.num_blocks, request.block_size, request.replica, request.address)
        except PoolLimitError as exc:
            status = grpc.StatusCode.INVALID_ARGUMENT if exc.too_large else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(status, str(exc))
        if self.events is not None:
            self.events.attach(pool_id, request.replica, self.registry.pools[pool_id].allocator)
            self.events.flush()
        log.info(
            "registered %s for replica %r: %d blocks x %d tokens%s",
            pool_id,
            request.replica,
            request.num_blocks,
            request.block_size,
            f", serving at {request.address}" if request.address else "",
        )
        export_pool(pool_id, self.registry.pools[pool_id], len(self.registry.pools))
        return memory_pb2.RegisterPoolResponse(pool_id=pool_id, lease_ttl_s=self.registry.lease_ttl_s)

    async def Heartbeat(self, request, context):
        pool = await self._pool(request.pool_id, context)
        before = pool.address
        try:
            changed = self.registry.advertise(pool, request.address)
        except PoolLimitError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if changed:
            log.info(
                "replica %r (%s) %s",
                pool.replica,
                request.pool_id,
                f"serves at {request.address}" if request.address else f"withdrew {before}",
            )
        return memory_pb2.HeartbeatResponse()

    async def Match(self, request, context):
        return memory_pb2.MatchResponse(
            replicas=[replica_match_to_proto(m) for m in self.registry.match(list(request.block_hashes))],
            epoch=self.registry.epoch,
            lease_ttl_s=self.registry.lease_ttl_s,
        )

    async def ListReplicas(self, request, context):
        return memory_pb2.ListReplicasResponse(
            replicas=[
                memory_pb2.ListedReplica(address=pool.address, replica=pool.replica, pool_id=pool_id)
                for pool_id, pool in self.registry.advertised()
            ],
            epoch=self.registry.epoch,
            lease_ttl_s=self.registry.lease_ttl_s,
        )

    async def StepStream(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield await self._step(request, context)
            finally:  # the answer is sent (or the stream ended): now the watchers and the log get its events
                if self.events is not None:
                    self.events.flush()

    async def _step(self, request, context) -> memory_pb2.StepResponse:
        pool = await self._pool(request.pool_id, context)
        pool.num_waiting = request.num_waiting
        step = step_request_from_proto(request)
        try:
            result = apply_step(pool.allocator, step)
        except (BlockAllocatorError, ValueError) as exc:  # a malformed step: nothing of it was applied
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        export_pool(request.pool_id, pool, len(self.registry.pools), result.stats)  # the step already computed them
        return step_response_to_proto(result, request.pool_id, pool.replica)

    async def ReleasePool(self, request, context):
        await self._pool(request.pool_id, context)
        pool = self.registry.release(request.pool_id)
        if self.events is not None:
            self.events.detach(request.pool_id, pool.replica, pool.allocator, "released")
            self.events.flush()
        log.info("released %s (replica %r)", request.pool_id, pool.replica)
        unexport_pool(request.pool_id, pool, len(self.registry.pools))
        return memory_pb2.ReleasePoolResponse()

    async def Stats(self, request, context):
        ids = [request.pool_id] if request.pool_id else list(self.registry.pools)
        pools = []
        for pool_id in ids:
            pool = self.registry.pools.get(pool_id)
            if pool is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"pool_id {pool_id!r} is not registered")
            pools.append(stats_to_proto(pool.allocator.stats(), pool_id, pool.replica))
        return memory_pb2.StatsResponse(pools=pools)

    def expire_leases(self) -> None:
        for pool_id, pool in self.registry.expire():
            if self.events is not None:
                self.events.detach(pool_id, pool.replica, pool.allocator, "expired")
                self.events.flush()
            st = pool.allocator.stats()
            log.warning(
                "lease of %s (replica %r) ran out: freed %d blocks of %d sequences; the id is fenced",
                pool_id,
                pool.replica,
                st.num_used_blocks,
                st.num_sequences,
            )
            EXPIRED.inc()
            unexport_pool(pool_id, pool, len(self.registry.pools))

    async def WatchEvents(self, request, context):
        if self.events is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "block events are off (--block-events)")
        if request.snapshot and request.after_seq:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "snapshot and after_seq: a snapshot already holds the events it would replay",
            )
        try:
            subscription = self.events.subscribe(min(request.max_queue or QUEUE_BATCHES, self.max_watcher_queue))
        except TooManyWatchers as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:  # first: from which event on this watcher sees everything
            first = [marker(Watching(), self.events.seq)]
            if request.snapshot:
                first += [self.snapshot(pool_id, pool) for pool_id, pool in list(self.registry.pools.items())]
            if request.after_seq:
                first += self.events.since(request.after_seq)
            yield events_message(first)
            while True:
                yield events_message(await subscription.get(coalesce_s=COALESCE_S))
        finally:
            self.events.unsubscribe(subscription)

    def snapshot(self, pool_id: str, pool: Pool) -> dict:
        """A pool's whole state now (not recorded): what a new watcher or page starts from."""
        return self.events.current_snapshot(pool_id, pool.replica, pool.allocator)

    async def _pool(self, pool_id: str, context) -> Pool:
        try:
            return self.registry.pool(pool_id)
        except FencedPoolError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except UnknownPoolError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))


async def _expire_leases_forever(servicer: MemoryServicer, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        servicer.expire_leases()


async def serve(config: MemoryServiceConfig) -> None:
    refuse_open_listener(
        "memory", config.host, bool(config.internal_token_file), config.allow_unauthenticated, "--internal-token-file"
    )
    server, health = make_server([SERVICE], interceptors=internal_interceptors(config.internal_token_file))
    registry = PoolRegistry(config.lease_ttl_s, limits=config.pool_limits())
    events = (
        EventRecorder(config.event_ring_size, config.event_log, registry.epoch, config.max_watchers)
        if config.block_events
        else None
    )
    servicer = MemoryServicer(registry, events, config.max_watcher_queue)
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server)
    page, expiry = None, None
    try:
        port = bind(server, config.host, config.port)
        if config.metrics_port:
            start_http_server(config.metrics_port, addr=config.host)
        await server.start()
        if config.http_port and events is not None:
            page = await start_block_map(servicer, config.host, config.http_port, config.internal_token_file)
        await set_serving(health, [SERVICE])
        expiry = asyncio.create_task(_expire_leases_forever(servicer, min(0.5, config.lease_ttl_s / 4)))
        log.info(
            "memory service %s listening on %s:%d (lease %.1f s, metrics on :%s, block map on :%s)",
            registry.epoch,
            config.host,
            port,
            config.lease_ttl_s,
            config.metrics_port or "off",
            config.http_port if page else "off",
        )
        await until_stop_signal()
        await server.stop(grace=1.0)
        if events is not None:  # no step runs any more: the log ends with every pool's state
            for pool_id, pool in registry.pools.items():
                events.snapshot(pool_id, pool.replica, pool.allocator)
    finally:
        if expiry is not None:
            expiry.cancel()
        if page is not None:
            await page.stop()
        if events is not None:
            events.close()
        await server.stop(grace=None)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(parse_config(MemoryServiceConfig, argv, __doc__)))


if __name__ == "__main__":
    main()
