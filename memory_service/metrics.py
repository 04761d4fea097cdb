"""The memory service's Prometheus metrics: per pool (labelled by pool id and replica) the
allocator's block counts and prefix-cache counters, and the registry's pools and expiries."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from memory_service.contract import AllocatorStats
from memory_service.pools import Pool

FREE_BLOCKS = Gauge("memory_free_blocks", "Free KV blocks", ["pool", "replica"])
USED_BLOCKS = Gauge("memory_used_blocks", "Used KV blocks", ["pool", "replica"])
UTILIZATION = Gauge("memory_kv_utilization", "Tokens stored / slots in used blocks", ["pool", "replica"])
CACHED_BLOCKS = Gauge("memory_cached_blocks", "Free KV blocks still holding a cached prefix", ["pool", "replica"])
PREFIX_QUERY_TOKENS = Gauge(
    "memory_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", ["pool", "replica"]
)
PREFIX_HIT_TOKENS = Gauge(
    "memory_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", ["pool", "replica"]
)
PREFIX_HIT_RATE = Gauge("memory_prefix_cache_hit_rate", "Prefix cache hit tokens / query tokens", ["pool", "replica"])
_POOL_GAUGES = (
    FREE_BLOCKS,
    USED_BLOCKS,
    UTILIZATION,
    CACHED_BLOCKS,
    PREFIX_QUERY_TOKENS,
    PREFIX_HIT_TOKENS,
    PREFIX_HIT_RATE,
)
EXPIRED = Counter("memory_pools_expired_total", "Pools freed because their lease ran out")
POOLS = Gauge("memory_pools", "Registered pools")


def export_pool(pool_id: str, pool: Pool, num_pools: int, st: AllocatorStats | None = None) -> None:
    """Set a pool's gauges (from `st` when the caller already has its stats)."""
    st = pool.allocator.stats() if st is None else st
    FREE_BLOCKS.labels(pool_id, pool.replica).set(st.num_free_blocks)
    USED_BLOCKS.labels(pool_id, pool.replica).set(st.num_used_blocks)
    UTILIZATION.labels(pool_id, pool.replica).set(st.utilization)
    CACHED_BLOCKS.labels(pool_id, pool.replica).set(st.num_cached_blocks)
    PREFIX_QUERY_TOKENS.labels(pool_id, pool.replica).set(st.prefix_query_tokens)
    PREFIX_HIT_TOKENS.labels(pool_id, pool.replica).set(st.prefix_hit_tokens)
    PREFIX_HIT_RATE.labels(pool_id, pool.replica).set(st.prefix_hit_rate)
    POOLS.set(num_pools)


def unexport_pool(pool_id: str, pool: Pool, num_pools: int) -> None:
    """A pool is gone: its series go with it."""
    for gauge in _POOL_GAUGES:
        gauge.remove(pool_id, pool.replica)
    POOLS.set(num_pools)
