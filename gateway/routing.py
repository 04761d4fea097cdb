"""Which SERVING replica a request goes to: the routing policies (`--routing`).

- `round-robin`: the next replica in address order, whatever it holds.
- `least-loaded`: the fewest requests this gateway has in flight there (ties in turn).
- `kv-aware` (default): the memory service is the cluster's exact KV index, so one `Match` call
  per request tells, for every replica, how many leading blocks of the prompt it already holds
  (cached or in use, never stale: a block is matchable from the step after its forward wrote it)
  and its load. The replica with the lowest cost wins, after NVIDIA Dynamo's KV-router
  formulation (overlap-weighted prefill + load), all in blocks or sequences:

      cost = overlap_weight * (prompt_blocks - matched) + pending_prefill + sequences

  `prompt_blocks - matched` is the prefill this request would cost there; `pending_prefill` the
  prefill of prompts this gateway routed there that have not produced a token yet (the queue a
  new prompt waits behind: prefills run before decodes); `sequences` the sequences running or
  waiting there (the memory service's count: every gateway's requests). The request's own
  uncached prefill weighs `overlap_weight` (default 2) against the queue's 1: prefilling a
  prefix on a second replica costs its compute and also the cache space that second copy takes
  from other prefixes (later misses), while waiting behind a queue costs this request alone.
  Measured at 2 req/s on the shared-prefix benchmark (docs/benchmarks.md, "Routing across replicas"): weight
  1 sent requests away from their prefix whenever its replica had a miss queued (prefix hit rate
  0.63, normalized latency 79.6 ms); weight 2 kept them (0.79, 58.7 ms).
  Dynamo counts decode load in active blocks; we count sequences, because a replica's active
  blocks are dominated by the shared prefixes it holds in use (one 768-token system prompt is 48
  blocks, however many requests read it), which is exactly the cache this policy exploits, not
  load: measured on the shared-prefix benchmark, blocks as load moved requests off their prefix's
  replica (prefix hit rate 0.44 at 1 req/s instead of 0.71). A decode step of this engine costs about the
  same per sequence whatever its length (the weights dominate), so one sequence ~ one unit.
  A hot prefix therefore stays where it is cached until that replica's queue of prefill plus
  its sequences exceeds another's by `overlap_weight` x the prefill it would save, then spills
  over (and is cached there too). Ties go to fewer requests in flight, then to the emptier cache (fewest blocks in
  use or cached: a new prefix lands where it evicts least, so an idle cluster's prefixes spread
  over its caches), then in turn. `overlap_weight` 0 = pure load balancing.
  The memory service cannot know blocks that are still being computed: prompts this gateway
  routed and that have not finished count as held on their replica too (`routed_blocks`), so a
  prefix is not sent elsewhere in the step between its forward and its commit. If `Match` fails
  (memory service down, or slower than `match_timeout_s`), the cost uses this gateway's view
  alone (its in-flight requests as the load).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from common.block_hash import num_leading, prompt_block_hashes
from gateway.metrics import MATCH_FAILURES, MATCH_MS, ROUTED
from gateway.replica_set import Replica, ReplicaSet
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
    """One attempt's replica and what the replica set counts there until the attempt ends."""

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
            self.replica.prefilled(self.prefill_blocks)

    def count_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """The attempt's first Complete (gateway.replica_set counts it)."""
        self.replica.count_prompt(prompt_tokens, self.matched_tokens, cached_tokens)

    def release(self) -> None:
        """The attempt ended (finished, failed or cancelled); idempotent."""
        if self._released:
            return
        self._released = True
        self.prefilled()
        self.replica.release(self.key.block_hashes)


class Routing:
    def __init__(
        self,
        policy: str,
        replicas: ReplicaSet,
        memory: memory_pb2_grpc.MemoryServiceStub | None,
        overlap_weight: float = 2.0,
        match_timeout_s: float = 0.25,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing must be one of {POLICIES}, got {policy!r}")
        if overlap_weight < 0:
            raise ValueError(f"kv_overlap_weight must be >= 0, got {overlap_weight}")
        self.policy, self.replicas, self.memory = policy, replicas, memory
        self.overlap_weight, self.match_timeout_s = overlap_weight, match_timeout_s
        self.block_size, self.namespace, self.caches_prefixes = 16, "", False
        self._turn = 0
        self._warned = False  # about a static replica list that does not match the advertised addresses

    def configure(self, block_size: int, namespace: str, caches_prefixes: bool) -> None:
        """The served model's block size and hash namespace (from a replica's Info)."""
        self.block_size, self.namespace, self.caches_prefixes = block_size, namespace, caches_prefixes

    def key(self, prompt: list[int], cache_salt: str) -> PrefixKey:
        """The request's prefix key, computed once (kv-aware only: the others never look)."""
        hashes = (
            prompt_block_hashes(prompt, self.block_size, self.namespace, cache_salt)
            if self.policy == "kv-aware" and self.caches_prefixes
            else []
        )
        return PrefixKey(hashes, -(-len(prompt) // self.block_size))

    async def choose(self, key: PrefixKey, exclude: set[str] = frozenset()) -> Route | None:
        """A route to the best SERVING replica not in `exclude` (None if there is none now); the
        caller must `release()` it when the attempt ends. Everything after the Match call is
        decided on the replica set as it is then (a replica may have left meanwhile)."""
        candidates = self.replicas.candidates(exclude)
        if self.policy == "kv-aware" and key.block_hashes and len(candidates) > 1:
            known = await self._match(key.block_hashes)
            candidates = self.replicas.candidates(exclude)  # as it is after the await
        else:
            known = None
        if not candidates:
            return None
        turn = self._turn
        self._turn += 1
        rotation = lambda order: (order - turn) % len(candidates)  # noqa: E731  ties go in turn
        matched_blocks = 0
        if self.policy == "round-robin":
            replica = candidates[turn % len(candidates)]
        elif self.policy == "least-loaded" or not key.block_hashes:
            replica = min(enumerate(candidates), key=lambda c: (c[1].in_flight, rotation(c[0])))[1]
        else:
            matched = {r.address: self._matched(key, r, known) for r in candidates}
            _, replica = min(
                enumerate(candidates),
                key=lambda c: (*self._rank(key, c[1], known, matched[c[1].address]), rotation(c[0])),
            )
            matched_blocks = matched[replica.address]
        prefill = max(key.prompt_blocks - matched_blocks, 0)
        replica.take(key.block_hashes, prefill)
        ROUTED.labels(self.policy, replica.address).inc()
        return Route(replica, matched_blocks * self.block_size, key, prefill)

    def _matched(self, key: PrefixKey, replica: Replica, known: dict | None) -> int:
        """Leading blocks of the prompt the replica holds: the memory service's exact count, or
        more if prompts this gateway routed there (not committed yet) hold more."""
        there = (known or {}).get(replica.address)
        return max(there.matched_blocks if there else 0, num_leading(key.block_hashes, replica.routed_blocks))

    def _rank(self, key: PrefixKey, replica: Replica, known: dict | None, matched: int) -> tuple[float, int, int]:
        """(cost, requests in flight, blocks in use or cached) with `matched` leading blocks held
        there: smaller is better."""
        there = (known or {}).get(replica.address)
        sequences = there.num_running + there.num_waiting if there else replica.in_flight
        prefill = key.prompt_blocks - matched
        footprint = there.num_used_blocks + there.num_cached_blocks if there else 0
        return self.overlap_weight * prefill + replica.pending_prefill_blocks + sequences, replica.in_flight, footprint

    async def _match(self, hashes: list[bytes]) -> dict[str, memory_pb2.ReplicaMatch] | None:
        """address -> the memory service's answer for that replica (None if the call fails)."""
        if self.memory is None:
            return None
        start = time.perf_counter()
        try:
            reply = await self.memory.Match(memory_pb2.MatchRequest(block_hashes=hashes), timeout=self.match_timeout_s)
        except grpc.aio.AioRpcError as exc:
            MATCH_FAILURES.inc()
            log.debug("match failed (%s): routing on this gateway's view alone", exc.code().name)
            return None
        MATCH_MS.observe((time.perf_counter() - start) * 1000)
        known = {r.address: r for r in reply.replicas}
        if not self._warned and not any(r.address in known for r in self.replicas.replicas):
            self._warned = True
            log.warning(
                "no replica's address %s is among those the replicas advertise (%s): kv-aware routing "
                "sees no cached blocks; give compute_addresses exactly as the replicas advertise them",
                [r.address for r in self.replicas.replicas],
                sorted(known),
            )
        return known
