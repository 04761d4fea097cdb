"""Which SERVING replica a request goes to: the routing policies (`--routing`).

- `round-robin`: the next replica in address order, whatever it holds.
- `least-loaded`: the fewest requests this gateway has in flight there.
- `kv-aware` (default): the memory service is the cluster's exact KV index, so one `Match` call
  per request tells, for every replica, how many leading blocks of the prompt it already holds
  (cached or in use, never stale: a block is matchable from the step after its forward wrote it)
  and how many blocks its running sequences hold. The replica with the lowest cost wins, the
  cost being NVIDIA Dynamo's KV router formulation, in blocks:

      cost = overlap_weight * (pending_prefill + prompt_blocks - matched) + active_blocks

  `prompt_blocks - matched` is the prefill this request would cost there; `pending_prefill` the
  prefill of prompts this gateway routed there that have not produced a token yet; `active_blocks`
  the blocks its running sequences hold (the memory service's count: every gateway's requests).
  A hot prefix therefore stays where it is cached until that replica is `overlap_weight x` its
  length in blocks busier than another, then spills over (and is cached there too). Ties go to
  fewer requests in flight, then to the fuller free space (fewest blocks in use or cached: a new
  prefix lands where it evicts least, so an idle cluster's prefixes spread over its caches), then
  address order. `overlap_weight` 0 = pure load balancing.
  The memory service cannot know blocks that are still being computed: prompts this gateway
  routed and that have not finished count as held on their replica too (`routed_blocks`), so a
  burst of one prefix does not scatter before its first prefill commits. If `Match` fails
  (memory service down or slow past `match_timeout_s`), the cost uses this gateway's view alone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from common.block_hash import prompt_block_hashes
from gateway.metrics import MATCH_FAILURES, MATCH_MS, ROUTED
from gateway.router import Replica, ReplicaRouter
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger("gateway.routing")
POLICIES = ("kv-aware", "least-loaded", "round-robin")


@dataclass
class PrefixKey:
    """What a router needs of a request to look its prompt up: its full blocks' hashes."""

    block_hashes: list[bytes]
    prompt_blocks: int  # every block the prompt fills, the partial last one included


@dataclass(eq=False)
class Route:
    """One attempt's replica and what the router counted there until the attempt ends."""

    replica: Replica
    matched_tokens: int
    key: PrefixKey
    prefill_blocks: int  # counted in replica.pending_prefill_blocks until prefilled()
    _prefilled: bool = False
    _released: bool = False

    def prefilled(self) -> None:
        """Its first token arrived: its prefill is done."""
        if not self._prefilled:
            self._prefilled = True
            self.replica.pending_prefill_blocks -= self.prefill_blocks

    def release(self) -> None:
        """The attempt ended (finished, failed or cancelled)."""
        if self._released:
            return
        self._released = True
        self.prefilled()
        self.replica.in_flight -= 1
        routed = self.replica.routed_blocks
        for h in self.key.block_hashes:
            left = routed[h] - 1
            if left:
                routed[h] = left
            else:
                del routed[h]


class Routing:
    def __init__(self, policy: str, router: ReplicaRouter, memory: memory_pb2_grpc.MemoryServiceStub | None,
                 overlap_weight: float = 1.0, match_timeout_s: float = 0.25) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing must be one of {POLICIES}, got {policy!r}")
        if overlap_weight < 0:
            raise ValueError(f"kv_overlap_weight must be >= 0, got {overlap_weight}")
        self.policy, self.router, self.memory = policy, router, memory
        self.overlap_weight, self.match_timeout_s = overlap_weight, match_timeout_s
        self.block_size, self.namespace, self.caches_prefixes = 16, "", False
        self._turn = 0

    def configure(self, block_size: int, namespace: str, caches_prefixes: bool) -> None:
        """The served model's block size and hash namespace (from a replica's Info)."""
        self.block_size, self.namespace, self.caches_prefixes = block_size, namespace, caches_prefixes

    def key(self, prompt: list[int], cache_salt: str) -> PrefixKey:
        """The request's prefix key, computed once (kv-aware only: the others never look)."""
        hashes = (prompt_block_hashes(prompt, self.block_size, self.namespace, cache_salt)
                  if self.policy == "kv-aware" and self.caches_prefixes else [])
        return PrefixKey(hashes, -(-len(prompt) // self.block_size))

    async def choose(self, key: PrefixKey, exclude: set[str] = frozenset()) -> Route | None:
        """A route to the best SERVING replica not in `exclude` (None if there is none now); the
        caller must `release()` it when the attempt ends."""
        candidates = self.router.candidates(exclude)
        if not candidates:
            return None
        matched_blocks = 0
        if self.policy == "round-robin":
            replica = candidates[self._turn % len(candidates)]
            self._turn += 1
        elif self.policy == "least-loaded" or not key.block_hashes:
            replica = min(candidates, key=lambda r: r.in_flight)
        else:
            replica, matched_blocks = await self._kv_aware(key, candidates)
        prefill = max(key.prompt_blocks - matched_blocks, 0)
        replica.in_flight += 1
        replica.pending_prefill_blocks += prefill
        replica.requests_routed += 1
        replica.matched_tokens += matched_blocks * self.block_size
        for h in key.block_hashes:
            replica.routed_blocks[h] = replica.routed_blocks.get(h, 0) + 1
        ROUTED.labels(self.policy, replica.address).inc()
        return Route(replica, matched_blocks * self.block_size, key, prefill)

    async def _kv_aware(self, key: PrefixKey, candidates: list[Replica]) -> tuple[Replica, int]:
        known = await self._match(key.block_hashes)
        best: tuple | None = None
        for order, replica in enumerate(candidates):
            matched_there, active, cached = known.get(replica.address, (0, 0, 0))
            matched = max(matched_there, _held(replica.routed_blocks, key.block_hashes))
            cost = self.overlap_weight * (replica.pending_prefill_blocks + key.prompt_blocks - matched) + active
            rank = (cost, replica.in_flight, active + cached, order)
            if best is None or rank < best[0]:
                best = (rank, replica, matched)
        return best[1], best[2]

    async def _match(self, hashes: list[bytes]) -> dict[str, tuple[int, int, int]]:
        """address -> (leading blocks held, blocks in use, blocks cached) from the memory service
        ({} if it fails)."""
        if self.memory is None:
            return {}
        start = time.perf_counter()
        try:
            reply = await self.memory.Match(memory_pb2.MatchRequest(block_hashes=hashes), timeout=self.match_timeout_s)
        except grpc.aio.AioRpcError as exc:
            MATCH_FAILURES.inc()
            log.debug("match failed (%s): routing on this gateway's view alone", exc.code().name)
            return {}
        MATCH_MS.observe((time.perf_counter() - start) * 1000)
        return {r.address: (r.matched_blocks, r.num_used_blocks, r.num_cached_blocks) for r in reply.replicas}


def _held(routed: dict[bytes, int], hashes: list[bytes]) -> int:
    """Leading blocks of `hashes` that requests routed to a replica (still in flight) hold."""
    n = 0
    for h in hashes:
        if h not in routed:
            break
        n += 1
    return n
