"""Hypothesis drives the memory service's book of pools through their life (register, step,
heartbeat, time passing, lease expiry, a late step from a fenced pool, release, a restart of the
service) and checks after every rule that no block is owned twice or lost, that an expired pool
is gone whole and refused, and that no pool id ever repeats."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memory_service.block_allocator import BlockAllocatorError
from memory_service.contract import Allocation, StepRequest
from memory_service.pools import FencedPoolError, PoolLimitError, PoolRegistry, UnknownPoolError
from memory_service.step import apply_step

TTL = 5.0


class PoolLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.registry = PoolRegistry(TTL, clock=lambda: self.now)
        self.ever_issued: set[str] = set()
        self.expired: set[str] = set()
        self.seq_ids = iter(range(10**9))

    def _live(self) -> list[str]:
        return sorted(self.registry.pools)

    @rule(num_blocks=st.integers(1, 12))
    def register(self, num_blocks):
        held = len(self.registry.pools)  # every pool here is the one replica's
        try:
            pool_id = self.registry.register(num_blocks, 4, "replica")
        except PoolLimitError:  # refused exactly when the replica holds its maximum, and nothing was built
            assert held == self.registry.limits.max_pools_per_replica == len(self.registry.pools)
            return
        assert held < self.registry.limits.max_pools_per_replica
        assert pool_id not in self.ever_issued, "a pool id repeated"
        self.ever_issued.add(pool_id)

    @precondition(lambda self: self.registry.pools)
    @rule(data=st.data(), tokens=st.integers(1, 20), grow=st.integers(1, 6))
    def step(self, data, tokens, grow):
        pool_id = data.draw(st.sampled_from(self._live()))
        allocator = self.registry.pool(pool_id).allocator
        live = allocator.sequence_ids()
        free = data.draw(st.lists(st.sampled_from(live), unique=True)) if live else []
        grown = [s for s in live if s not in free][:1]
        request = StepRequest(
            free=free, allocate=[Allocation(f"s{next(self.seq_ids)}", tokens)], append=[(s, grow) for s in grown]
        )
        apply_step(self.registry.pool(pool_id).allocator, request)

    @precondition(lambda self: self.registry.pools)
    @rule(data=st.data())
    def heartbeat(self, data):
        self.registry.pool(data.draw(st.sampled_from(self._live())))  # renews the lease

    @rule(seconds=st.floats(0.5, 8.0))
    def time_passes(self, seconds):
        self.now += seconds

    @rule()
    def expire(self):
        due = {p for p, pool in self.registry.pools.items() if pool.lease_until < self.now}
        expired = {pool_id for pool_id, _ in self.registry.expire()}
        assert expired == due, "expired a live lease, or kept a dead one"
        self.expired |= expired

    @precondition(lambda self: self.expired)
    @rule(data=st.data())
    def late_step_from_a_fenced_pool(self, data):
        pool_id = data.draw(st.sampled_from(sorted(self.expired)))
        with pytest.raises(FencedPoolError):
            self.registry.pool(pool_id)
        with pytest.raises(FencedPoolError):
            self.registry.pool(pool_id)

    @precondition(lambda self: self.registry.pools)
    @rule(data=st.data())
    def release(self, data):
        pool_id = data.draw(st.sampled_from(self._live()))
        self.registry.release(pool_id)
        with pytest.raises(UnknownPoolError):
            self.registry.pool(pool_id)

    @rule()
    def memory_service_restarts(self):
        """A new instance knows no pool: every old id is refused, and new ids are new."""
        old = set(self.registry.pools) | self.expired
        self.registry = PoolRegistry(TTL, clock=lambda: self.now)
        self.expired = set()
        for pool_id in old:
            with pytest.raises(UnknownPoolError, match="another memory-service instance"):
                self.registry.pool(pool_id)

    @invariant()
    def no_block_owned_twice_or_lost(self):
        for pool in self.registry.pools.values():
            alloc = pool.allocator
            holders = Counter(b for s in alloc.sequence_ids() for b in alloc.block_table(s))
            assert alloc.num_free_blocks + len(holders) == alloc.num_blocks
            assert all(alloc.ref_count(b) == n for b, n in holders.items())
            assert len(set(alloc._free)) == alloc.num_free_blocks and not set(alloc._free) & set(holders)

    @invariant()
    def expired_pools_are_gone(self):
        assert not self.expired & set(self.registry.pools)


PoolLifecycle.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPoolLifecycle = PoolLifecycle.TestCase


def test_a_malformed_step_on_a_live_pool_is_refused_without_touching_the_lease_book():
    registry = PoolRegistry(TTL, clock=lambda: 0.0)
    pool_id = registry.register(4, 4, "r")
    with pytest.raises(BlockAllocatorError):
        apply_step(registry.pool(pool_id).allocator, StepRequest(free=["ghost"]))
    assert pool_id in registry.pools
