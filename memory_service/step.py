"""One engine step's block bookkeeping, as a single batched request.

The compute side sends everything a step needs at once (sequences to free, prompts to admit,
sequences that grow) and gets back the block tables that changed, the copy-on-write copies to
perform, and which sequences found no space (nothing changed for those: the scheduler preempts
or requeues them). In-process this is a function call; the memory service serves it over gRPC.
Order inside a step: frees, then allocations, then appends, so freed blocks are reusable at once.
The call is split into send and receive so the compute side can send the next step's request
before its forward runs and read the answer after it (the round trip hides behind the forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from memory_service.block_allocator import AllocatorStats, BlockAllocator, OutOfBlocksError, SeqId


@dataclass
class Allocation:
    seq_id: SeqId
    num_tokens: int
    reserve_tokens: int = 0  # > num_tokens reserves up front (contiguous mode)


@dataclass
class StepRequest:
    free: list[SeqId] = field(default_factory=list)
    allocate: list[Allocation] = field(default_factory=list)
    append: list[tuple[SeqId, int]] = field(default_factory=list)  # (seq_id, num_new_tokens)


@dataclass
class StepResponse:
    block_tables: dict[SeqId, list[int]]  # full table of every sequence whose table changed
    copies: list[tuple[int, int]]  # (src, dst) blocks to copy before this step's writes
    rejected: list[SeqId]  # allocations/appends that found no space
    stats: AllocatorStats


def apply_step(allocator: BlockAllocator, request: StepRequest) -> StepResponse:
    """Apply one step's frees, allocations and appends. Unknown ids in `free` raise."""
    for seq_id in request.free:
        allocator.free(seq_id)
    tables: dict[SeqId, list[int]] = {}
    copies: list[tuple[int, int]] = []
    rejected: list[SeqId] = []
    for alloc in request.allocate:
        try:
            tables[alloc.seq_id] = allocator.allocate(alloc.seq_id, alloc.num_tokens, alloc.reserve_tokens)
        except OutOfBlocksError:
            rejected.append(alloc.seq_id)
    for seq_id, num_new in request.append:
        try:
            result = allocator.append_slots(seq_id, num_new)
        except OutOfBlocksError:
            rejected.append(seq_id)
            continue
        if result.new_blocks or result.copies:
            tables[seq_id] = allocator.block_table(seq_id)
            copies.extend(result.copies)
    return StepResponse(block_tables=tables, copies=copies, rejected=rejected, stats=allocator.stats())


class MemoryConnection(Protocol):
    """The compute side's end of the memory call: at most one request in flight."""

    def send(self, request: StepRequest) -> None: ...

    def receive(self) -> StepResponse: ...


class LocalMemory:
    """The memory side in the same process (the in-process engine): applied at send."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self._response: StepResponse | None = None

    def send(self, request: StepRequest) -> None:
        assert self._response is None, "one request in flight at a time"
        self._response = apply_step(self.allocator, request)

    def receive(self) -> StepResponse:
        response, self._response = self._response, None
        assert response is not None, "receive() without send()"
        return response
