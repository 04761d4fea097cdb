"""Every compute replica's pool, held under a lease: the memory service's book of pools.

No gRPC and no torch here (the server translates; tests drive this directly with a fake clock).
- Pool ids are "<epoch>-<n>", the epoch drawn when this instance starts: ids never repeat across
  restarts, so a step meant for an old incarnation can never land on a new pool.
- A pool's replica advertises the address it serves on (at registration or in a heartbeat, once it
  is SERVING): the registry is then the cluster's list of live replicas (discovery) and, with each
  pool's prefix cache, its KV index (`match`).
- A pool's lease is renewed by each step and each heartbeat. When it runs out, `expire()` drops
  the pool with every block and table in it and fences its id: a late step or heartbeat from a
  replica that was paused rather than dead is refused (`FencedPoolError`), never applied.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from memory_service.block_allocator import BlockAllocator

MAX_FENCED = 10_000  # ids remembered as expired (the oldest are forgotten: then NOT_FOUND)


class UnknownPoolError(KeyError):
    """No such pool here: never registered, released, or from another memory-service instance."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FencedPoolError(Exception):
    """The pool's lease ran out and its blocks were freed: its replica must register again."""


class PoolLimitError(ValueError):
    """A registration past what the memory service agreed to hold (PoolLimits). `too_large`:
    the pool itself can never fit; otherwise there are too many pools now."""

    def __init__(self, message: str, too_large: bool) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class PoolLimits:
    """What one caller can make the memory service hold. A pool's bookkeeping costs about 60
    bytes and 0.4 us a block to create (measured: 2^20 blocks, 63 MB, 0.43 s), on the event loop
    every replica's steps share, so a registration is bounded before any of it is built."""

    max_pool_blocks: int = 1 << 18  # 4M tokens at block size 16; about 16 MB and 0.1 s to create
    max_block_size: int = 1024
    max_pools: int = 64
    max_pools_per_replica: int = 4  # a replica that re-registers keeps its old pool until its lease runs out
    max_total_blocks: int = 1 << 21  # every pool's together: about 126 MB of bookkeeping at most
    max_name_chars: int = 256  # a replica's name and address (kept per pool, logged, used as metric labels)


@dataclass
class Pool:
    allocator: BlockAllocator
    replica: str
    lease_until: float
    address: str = ""  # where the replica serves Generate; empty = not routed to (starting, draining)
    num_waiting: int = 0  # requests queued on the replica, as its last step reported


@dataclass
class ReplicaMatch:
    pool_id: str
    pool: Pool
    matched_blocks: int  # leading blocks of the asked prompt the pool holds (cached or in use)


class PoolRegistry:
    def __init__(
        self,
        lease_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        epoch: str | None = None,
        limits: PoolLimits = PoolLimits(),
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        self.lease_ttl_s = lease_ttl_s
        self.limits = limits
        self.clock = clock
        self.epoch = epoch or secrets.token_hex(4)
        self.pools: dict[str, Pool] = {}
        self._fenced: OrderedDict[str, None] = OrderedDict()
        self._ids = itertools.count()

    def register(self, num_blocks: int, block_size: int, replica: str, address: str = "") -> str:
        """A new pool's id; PoolLimitError (nothing built) past the limits."""
        limits = self.limits
        if num_blocks > limits.max_pool_blocks or block_size > limits.max_block_size:
            raise PoolLimitError(
                f"a pool of {num_blocks} blocks of {block_size} tokens is past this memory service's limits "
                f"(max_pool_blocks {limits.max_pool_blocks}, block size at most {limits.max_block_size})",
                too_large=True,
            )
        if len(replica) > limits.max_name_chars or len(address) > limits.max_name_chars:
            raise PoolLimitError(f"replica and address are at most {limits.max_name_chars} characters", True)
        if len(self.pools) >= limits.max_pools:
            raise PoolLimitError(f"this memory service holds its maximum of {limits.max_pools} pools", False)
        if sum(p.allocator.num_blocks for p in self.pools.values()) + num_blocks > limits.max_total_blocks:
            raise PoolLimitError(
                f"this memory service holds its maximum of {limits.max_total_blocks} blocks in all pools", False
            )
        if sum(p.replica == replica for p in self.pools.values()) >= limits.max_pools_per_replica:
            raise PoolLimitError(
                f"replica {replica!r} already holds {limits.max_pools_per_replica} pools (max_pools_per_replica)", False
            )
        pool_id = f"{self.epoch}-{next(self._ids)}"
        self.pools[pool_id] = Pool(
            BlockAllocator(num_blocks, block_size), replica, self.clock() + self.lease_ttl_s, address
        )
        return pool_id

    def pool(self, pool_id: str) -> Pool:
        """The live pool, its lease renewed (every call that names a pool is a sign of life)."""
        if pool_id in self._fenced:
            raise FencedPoolError(
                f"pool_id {pool_id!r} expired: its lease ran out and its blocks were freed; register again"
            )
        pool = self.pools.get(pool_id)
        if pool is None:
            other = not pool_id.startswith(f"{self.epoch}-")
            raise UnknownPoolError(
                f"pool_id {pool_id!r} is not registered"
                + (" (it is from another memory-service instance: restarted?)" if other else "")
            )
        pool.lease_until = self.clock() + self.lease_ttl_s
        return pool

    @staticmethod
    def advertise(pool: Pool, address: str) -> bool:
        """Set the address the pool's replica serves on (empty = withdrawn); True if it changed.
        An address past PoolLimits.max_name_chars is PoolLimitError, as at registration."""
        if len(address) > PoolLimits.max_name_chars:
            raise PoolLimitError(f"address is at most {PoolLimits.max_name_chars} characters", True)
        changed = pool.address != address
        pool.address = address
        return changed

    def advertised(self) -> list[tuple[str, Pool]]:
        """(pool id, pool) of every live pool that advertises an address: discovery. A replica
        that registered again (its link broke) while its old pool's lease still runs appears
        once, as its newest pool: the old one is being dropped."""
        newest: dict[str, tuple[str, Pool]] = {}
        for pool_id, pool in self.pools.items():  # registration order: a later pool replaces an earlier one
            if pool.address:
                newest[pool.address] = (pool_id, pool)
        return list(newest.values())

    def match(self, block_hashes: list[bytes]) -> list[ReplicaMatch]:
        """Every advertised pool, with how many leading blocks of `block_hashes` it holds."""
        return [
            ReplicaMatch(pool_id, pool, pool.allocator.matched_blocks(block_hashes))
            for pool_id, pool in self.advertised()
        ]

    def release(self, pool_id: str) -> Pool:
        pool = self.pool(pool_id)
        del self.pools[pool_id]
        return pool

    def expire(self) -> list[tuple[str, Pool]]:
        """Drop and fence every pool whose lease has run out; returns them."""
        now = self.clock()
        expired = [(pool_id, pool) for pool_id, pool in self.pools.items() if pool.lease_until < now]
        for pool_id, _ in expired:
            del self.pools[pool_id]
            self._fenced[pool_id] = None
            while len(self._fenced) > MAX_FENCED:
                self._fenced.popitem(last=False)
        return expired
