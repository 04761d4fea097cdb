"""The routing policies' choices (gateway/routing.py) and the memory service's KV index
(PoolRegistry.match), without processes: replicas are plain records, the Match answer is built
from real BlockAllocators."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.block_hash import prompt_block_hashes
from gateway.metrics import MATCH_FAILURES
from gateway.replica_set import Replica
from gateway.routing import Routing
from memory_service.pools import PoolRegistry
from memory_service.server import replica_match_to_proto
from rpc.internal.v1 import memory_pb2

BLOCK = 16
NAMESPACE = "dummy:tiny|float32|float32"


class FakeReplicaSet:
    def __init__(self, addresses):
        self.replicas = [Replica(a, channel=None, stub=None, watched=True) for a in addresses]

    def candidates(self, exclude=frozenset()):
        return sorted((r for r in self.replicas if r.serving and r.address not in exclude), key=lambda r: r.address)


class IndexMemory:
    """The memory service's Match over a real PoolRegistry (what memory_service.server answers)."""

    def __init__(self, registry: PoolRegistry, fail: bool = False) -> None:
        self.registry, self.fail, self.calls = registry, fail, 0

    async def Match(self, request, timeout=None):
        self.calls += 1
        if self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "memory service is down")
        return memory_pb2.MatchResponse(
            replicas=[replica_match_to_proto(m) for m in self.registry.match(list(request.block_hashes))]
        )


def prompt(group: int, length: int = 100) -> list[int]:
    return [(group * 1000 + i) % 50000 for i in range(length)]


def hashes(tokens):
    return prompt_block_hashes(tokens, BLOCK, NAMESPACE)


def cache_prompt(registry, pool_id, tokens, seq_id, keep=True):
    """A replica served `tokens`: its full blocks are committed (and kept in use if `keep`)."""
    allocator = registry.pools[pool_id].allocator
    allocator.allocate(seq_id, len(tokens), block_hashes=hashes(tokens))
    allocator.commit(seq_id, 0, hashes(tokens))
    if not keep:
        allocator.free(seq_id)


@pytest.fixture
def cluster():
    registry = PoolRegistry(lease_ttl_s=5.0, clock=lambda: 0.0)
    ids = {a: registry.register(256, BLOCK, a, address=a) for a in ("a:1", "b:1")}
    router = FakeReplicaSet(["a:1", "b:1"])
    return registry, ids, router


def make_routing(policy, router, memory, weight=2.0):
    routing = Routing(policy, router, memory, overlap_weight=weight)
    routing.configure(BLOCK, NAMESPACE, caches_prefixes=True)
    return routing


def choose(routing, tokens, exclude=frozenset()):
    return asyncio.run(routing.choose(routing.key(tokens, ""), exclude))


def test_kv_aware_goes_where_the_prefix_is_cached_and_reports_the_match(cluster):
    registry, ids, router = cluster
    cache_prompt(registry, ids["b:1"], prompt(1), "s", keep=False)  # cached, evictable: still a match
    routing = make_routing("kv-aware", router, IndexMemory(registry))
    route = choose(routing, prompt(1) + [7, 8, 9])
    assert route.replica.address == "b:1" and route.matched_tokens == 6 * BLOCK  # 100 tokens: 6 full blocks
    route.release()
    fresh = choose(routing, prompt(2))  # cached nowhere, idle everywhere: where it evicts least
    assert fresh.replica.address == "a:1" and fresh.matched_tokens == 0


def test_on_an_idle_cluster_a_new_prefix_goes_where_it_evicts_least(cluster):
    registry, ids, router = cluster
    cache_prompt(registry, ids["a:1"], prompt(1), "s", keep=False)  # a's cache holds 6 blocks, b's none
    routing = make_routing("kv-aware", router, IndexMemory(registry))
    assert choose(routing, prompt(2)).replica.address == "b:1"


def test_a_hot_prefix_spills_over_only_when_its_replica_is_busier_by_the_prefill_it_saves(cluster):
    registry, ids, router = cluster
    cache_prompt(registry, ids["a:1"], prompt(1, 160), "hot", keep=False)  # 10 blocks cached on a
    for i in range(3):  # b runs 3 long sequences: 48 blocks in use, but 3 sequences of load
        cache_prompt(registry, ids["b:1"], prompt(10 + i, 256), f"b{i}")
    routing = make_routing("kv-aware", router, IndexMemory(registry))  # overlap weight 2
    question = prompt(1, 160) + [5] * 20  # 12 blocks, 11 full; 10 cached on a
    assert choose(routing, question).replica.address == "a:1"  # a: 2 x 2 + 0; b: 2 x 12 + 3 = 27
    for i in range(20):
        cache_prompt(registry, ids["a:1"], prompt(20 + i, 16), f"a{i}")
    assert choose(routing, question).replica.address == "a:1"  # a: 2 x 1 + 2 pending + 20 = 24 < 27
    for i in range(20, 23):
        cache_prompt(registry, ids["a:1"], prompt(20 + i, 16), f"a{i}")
    assert choose(routing, question).replica.address == "b:1"  # a: 2 x 1 + 3 pending + 23 = 28 > 27
    load_only = make_routing("kv-aware", router, IndexMemory(registry), weight=0.0)
    assert choose(load_only, question).replica.address == "b:1"  # a: 3 pending + 23 sequences; b: 12 + 3


def test_a_prefix_routed_but_not_yet_committed_counts_as_held_there(cluster):
    registry, ids, router = cluster
    memory = IndexMemory(registry)
    routing = make_routing("kv-aware", router, memory)
    first = choose(routing, prompt(3) + [0])  # 101 tokens: 7 blocks, 6 full; cached nowhere
    assert first.replica.address == "a:1"
    # Nothing is committed yet, but `first` will hold the prefix on a: the next request of it
    # costs a 2 x 1 + 7 pending = 9, b 2 x 7 = 14.
    second = choose(routing, prompt(3) + [1])
    assert second.replica.address == "a:1" and second.matched_tokens == 6 * BLOCK
    other = choose(routing, prompt(4))  # another prefix: a 14 + 8 pending, b 14
    assert other.replica.address == "b:1" and other.matched_tokens == 0
    first.prefilled()
    for route in (first, second, other):
        route.release()
        route.release()  # idempotent: an attempt ends once
    for replica in router.replicas:  # nothing left counted: no leak of load or routed blocks
        assert (replica.in_flight, replica.pending_prefill_blocks, replica.routed_blocks) == (0, 0, {})
    assert memory.calls == 3


def test_kv_aware_routes_on_its_own_view_when_the_memory_service_fails(cluster):
    registry, ids, router = cluster
    cache_prompt(registry, ids["b:1"], prompt(1), "s", keep=False)  # b holds it: a working Match says b
    assert choose(make_routing("kv-aware", router, IndexMemory(registry)), prompt(1)).replica.address == "b:1"
    for replica in router.replicas:
        replica.in_flight, replica.pending_prefill_blocks, replica.routed_blocks = 0, 0, {}
    failures = MATCH_FAILURES._value.get()
    routing = make_routing("kv-aware", router, IndexMemory(registry, fail=True))
    first = choose(routing, prompt(1))
    assert first.replica.address == "a:1" and first.matched_tokens == 0  # b's cache is unknown without Match
    assert MATCH_FAILURES._value.get() == failures + 1
    first.prefilled()
    assert choose(routing, prompt(1)).replica.address == "a:1"  # but its own routes still count


def test_round_robin_and_least_loaded_and_exclusions(cluster):
    _, _, router = cluster
    rr = make_routing("round-robin", router, None)
    assert [choose(rr, prompt(1)).replica.address for _ in range(4)] == ["a:1", "b:1", "a:1", "b:1"]
    for replica in router.replicas:
        replica.in_flight = 0
    least = make_routing("least-loaded", router, None)
    held = choose(least, prompt(1))
    assert held.replica.address == "a:1" and choose(least, prompt(2)).replica.address == "b:1"
    assert choose(least, prompt(3), exclude={"b:1"}).replica.address == "a:1"
    router.replicas[0].serving = False
    assert choose(least, prompt(4), exclude={"b:1"}) is None


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing must be one of"):
        Routing("random", FakeReplicaSet([]), None)


def test_the_index_lists_advertised_live_pools_once_each_with_their_matches():
    now = [0.0]
    registry = PoolRegistry(lease_ttl_s=5.0, clock=lambda: now[0])
    starting = registry.register(64, BLOCK, "c", address="")  # not SERVING yet: not listed
    old = registry.register(64, BLOCK, "a", address="a:1")
    tokens = prompt(1, 64)
    cache_prompt(registry, old, tokens, "s")  # in use: held
    assert [(m.pool_id, m.matched_blocks) for m in registry.match(hashes(tokens))] == [(old, 4)]
    new = registry.register(64, BLOCK, "a", address="a:1")  # the replica registered again (its link broke)
    assert [(m.pool_id, m.matched_blocks) for m in registry.match(hashes(tokens))] == [(new, 0)]
    registry.advertise(registry.pool(starting), "c:1")
    assert sorted(m.pool.address for m in registry.match([])) == ["a:1", "c:1"]
    registry.advertise(registry.pool(starting), "")  # draining: withdrawn
    now[0] = 4.0
    registry.pool(new)
    now[0] = 6.0  # the old pool and the withdrawn one are not renewed: their leases end
    registry.expire()
    assert [m.pool_id for m in registry.match(hashes(tokens))] == [new]
