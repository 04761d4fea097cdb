"""The memory contract: what a compute replica and the memory service say to each other once
per engine step, and the only module of this package the compute side imports
(tests/test_layering.py checks it).

One engine step's block bookkeeping travels as a single batched request. The compute side sends
everything a step needs at once (full blocks whose forward has run, to commit to the prefix
cache; sequences to free; prompts to admit, with their block hashes; sequences that grow) and
gets back the block tables that changed, how many prompt tokens each admission found cached, and
which sequences found no space (nothing changed for those). Order inside a step: commits, frees,
appends, allocations (memory_service.step applies it, and its docstring says why).

The call is split into send and receive so the compute side can send the next step's request
before its forward runs and read the answer after it (the round trip hides behind the forward).
In-process the memory side is memory_service.step.LocalMemory; over gRPC, the compute service's
client and the memory service's servicer convert with the functions at the end of this module
(the one place the wire format meets these objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol

from rpc.internal.v1 import memory_pb2

SeqId = Hashable


@dataclass(frozen=True)
class AllocatorStats:
    num_blocks: int
    block_size: int
    num_free_blocks: int
    num_used_blocks: int
    num_tokens_stored: int  # filled token slots over all used blocks (shared blocks once)
    num_sequences: int
    num_cached_blocks: int = 0  # free blocks still holding cached content (evicted when needed)
    prefix_query_tokens: int = 0  # prompt tokens admissions looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found cached (their prefill was skipped)

    @property
    def utilization(self) -> float:
        """Tokens stored / slots in used blocks: how much of the taken memory holds real state."""
        slots = self.num_used_blocks * self.block_size
        return self.num_tokens_stored / slots if slots else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


@dataclass
class Allocation:
    seq_id: SeqId
    num_tokens: int
    reserve_tokens: int = 0  # > num_tokens reserves up front (contiguous mode)
    block_hashes: list[bytes] = field(default_factory=list)  # its full blocks' hashes: looked up in the cache


@dataclass
class Commit:
    """Full blocks of a sequence (logical indices first_block, ...) that a finished forward wrote."""

    seq_id: SeqId
    first_block: int
    block_hashes: list[bytes]


@dataclass
class StepRequest:
    """Applied in the order commit, free, append, allocate."""

    free: list[SeqId] = field(default_factory=list)
    allocate: list[Allocation] = field(default_factory=list)
    append: list[tuple[SeqId, int]] = field(default_factory=list)  # (seq_id, num_new_tokens)
    commit: list[Commit] = field(default_factory=list)
    num_waiting: int = 0  # not bookkeeping: the replica's queue length, its load as a router sees it
    step: int = 0  # the engine's step number, for block events
    preempted: list[SeqId] = field(default_factory=list)  # of `free`: freed by preemption (events say so)


@dataclass
class StepResponse:
    block_tables: dict[SeqId, list[int]]  # full table of every sequence whose table changed
    rejected: list[SeqId]  # allocations/appends that found no space
    stats: AllocatorStats
    hit_tokens: dict[SeqId, int] = field(default_factory=dict)  # per admission: prompt tokens found cached


class MemoryLost(Exception):
    """The memory side does not hold the caller's pool any more, or cannot be reached: send() or
    receive() raised it, and the caller must register a new pool (compute_service.async_engine)."""


class MemoryConnection(Protocol):
    """The compute side's end of the memory call: at most one request in flight. send() and
    receive() raise MemoryLost when the pool is gone."""

    def send(self, request: StepRequest) -> None: ...

    def receive(self) -> StepResponse: ...


# ---- the wire format (rpc/internal/v1/memory.proto) ----------------------------------------
def step_request_to_proto(request: StepRequest, pool_id: str) -> memory_pb2.StepRequest:
    return memory_pb2.StepRequest(
        pool_id=pool_id,
        commit=[
            memory_pb2.Commit(seq_id=str(c.seq_id), first_block=c.first_block, block_hashes=c.block_hashes)
            for c in request.commit
        ],
        free=[str(s) for s in request.free],
        allocate=[
            memory_pb2.Allocation(
                seq_id=str(a.seq_id),
                num_tokens=a.num_tokens,
                reserve_tokens=a.reserve_tokens,
                block_hashes=a.block_hashes,
            )
            for a in request.allocate
        ],
        append=[memory_pb2.Append(seq_id=str(s), num_new_tokens=n) for s, n in request.append],
        num_waiting=request.num_waiting,
        step=request.step,
        preempted=[str(s) for s in request.preempted],
    )


def step_request_from_proto(message: memory_pb2.StepRequest) -> StepRequest:
    return StepRequest(
        commit=[Commit(c.seq_id, c.first_block, list(c.block_hashes)) for c in message.commit],
        free=list(message.free),
        allocate=[Allocation(a.seq_id, a.num_tokens, a.reserve_tokens, list(a.block_hashes)) for a in message.allocate],
        append=[(a.seq_id, a.num_new_tokens) for a in message.append],
        num_waiting=message.num_waiting,
        step=message.step,
        preempted=list(message.preempted),
    )


def stats_to_proto(stats: AllocatorStats, pool_id: str = "", replica: str = "") -> memory_pb2.PoolStats:
    return memory_pb2.PoolStats(
        pool_id=pool_id,
        replica=replica,
        num_blocks=stats.num_blocks,
        block_size=stats.block_size,
        num_free_blocks=stats.num_free_blocks,
        num_used_blocks=stats.num_used_blocks,
        num_tokens_stored=stats.num_tokens_stored,
        num_sequences=stats.num_sequences,
        utilization=stats.utilization,
        num_cached_blocks=stats.num_cached_blocks,
        prefix_query_tokens=stats.prefix_query_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        prefix_hit_rate=stats.prefix_hit_rate,
    )


def stats_from_proto(message: memory_pb2.PoolStats) -> AllocatorStats:
    return AllocatorStats(
        num_blocks=message.num_blocks,
        block_size=message.block_size,
        num_free_blocks=message.num_free_blocks,
        num_used_blocks=message.num_used_blocks,
        num_tokens_stored=message.num_tokens_stored,
        num_sequences=message.num_sequences,
        num_cached_blocks=message.num_cached_blocks,
        prefix_query_tokens=message.prefix_query_tokens,
        prefix_hit_tokens=message.prefix_hit_tokens,
    )


def step_response_to_proto(response: StepResponse, pool_id: str, replica: str) -> memory_pb2.StepResponse:
    return memory_pb2.StepResponse(
        block_tables=[
            memory_pb2.BlockTable(seq_id=str(s), block_ids=t, hit_tokens=response.hit_tokens.get(s, 0))
            for s, t in response.block_tables.items()
        ],
        rejected=[str(s) for s in response.rejected],
        stats=stats_to_proto(response.stats, pool_id, replica),
    )


def step_response_from_proto(message: memory_pb2.StepResponse) -> StepResponse:
    return StepResponse(
        block_tables={t.seq_id: list(t.block_ids) for t in message.block_tables},
        rejected=list(message.rejected),
        stats=stats_from_proto(message.stats),
        hit_tokens={t.seq_id: t.hit_tokens for t in message.block_tables if t.hit_tokens},
    )
