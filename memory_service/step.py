"""One engine step's block bookkeeping applied to a BlockAllocator: the memory side of the
contract in memory_service.contract (which says what a step carries).

Order inside a step: commits, frees, appends, allocations: a finished sequence's blocks are
cached before they are released, freed blocks are reusable at once, and running sequences grow
before new ones are admitted (a step carries both: decodes beside the first chunks of prompts),
so a count that was off rejects an admission, which waits, rather than a growth, which preempts.
A step is atomic: the whole request is checked before any of it is applied, so a malformed one
(an unknown or repeated id) raises and changes nothing. Running out of blocks is not an error:
those allocations and appends are answered as rejected, and they alone change nothing.
"""

from __future__ import annotations

from memory_service.block_allocator import (
    BlockAllocator,
    DuplicateSequenceError,
    OutOfBlocksError,
    UnknownSequenceError,
)
from memory_service.contract import SeqId, StepRequest, StepResponse


def check_step(allocator: BlockAllocator, request: StepRequest) -> None:
    """Raise (BlockAllocatorError or ValueError) if any part of the step is malformed: ids follow
    the step's order (committed blocks must be full blocks of a live sequence, freed ids must
    exist and go away, allocated ids must be new, appended ids must exist and not be freed or
    allocated in this step: an allocation may be rejected for lack of space, and an append to it
    would then fail half-way),
    each id at most once per list, token counts positive."""
    live = set(allocator.sequence_ids())
    for commit in request.commit:
        allocator.check_commit(commit.seq_id, commit.first_block, len(commit.block_hashes))
    for seq_id in request.free:
        if seq_id not in live:
            raise UnknownSequenceError(f"cannot free sequence {seq_id!r}: it has no block table (double free?)")
        live.discard(seq_id)
    for alloc in request.allocate:
        if alloc.seq_id in live:
            raise DuplicateSequenceError(f"sequence {alloc.seq_id!r} already has a block table")
        if alloc.num_tokens <= 0 or alloc.reserve_tokens < 0:
            raise ValueError(f"allocation of {alloc.seq_id!r}: num_tokens must be > 0 and reserve_tokens >= 0")
    if len({a.seq_id for a in request.allocate}) < len(request.allocate):
        raise DuplicateSequenceError("a sequence is allocated twice in one step")
    appended: set[SeqId] = set()
    for seq_id, num_new in request.append:
        if seq_id not in live or seq_id in appended:
            raise UnknownSequenceError(f"cannot append to sequence {seq_id!r}: unknown, or appended twice")
        if num_new <= 0:
            raise ValueError(f"append to {seq_id!r}: num_new_tokens must be > 0, got {num_new}")
        appended.add(seq_id)


def apply_step(allocator: BlockAllocator, request: StepRequest) -> StepResponse:
    """Apply one step's commits, frees, appends and allocations, or (malformed request)
    raise having changed nothing."""
    check_step(allocator, request)
    allocator.step = request.step
    for commit in request.commit:
        allocator.commit(commit.seq_id, commit.first_block, commit.block_hashes)
    preempted = set(request.preempted)
    for seq_id in request.free:
        allocator.free(seq_id, "preempt" if seq_id in preempted else "finish")
    tables: dict[SeqId, list[int]] = {}
    rejected: list[SeqId] = []
    hit_tokens: dict[SeqId, int] = {}
    for seq_id, num_new in request.append:
        try:
            new_blocks = allocator.append_slots(seq_id, num_new)
        except OutOfBlocksError:
            rejected.append(seq_id)
            continue
        if new_blocks:
            tables[seq_id] = allocator.block_table(seq_id)
    for alloc in request.allocate:
        try:
            tables[alloc.seq_id] = allocator.allocate(
                alloc.seq_id, alloc.num_tokens, alloc.reserve_tokens, alloc.block_hashes
            )
            hit_tokens[alloc.seq_id] = allocator.hit_tokens(alloc.seq_id)
        except OutOfBlocksError:
            rejected.append(alloc.seq_id)
    return StepResponse(block_tables=tables, rejected=rejected, stats=allocator.stats(), hit_tokens=hit_tokens)


class LocalMemory:
    """The memory side in the same process (benchmarks and tests hand it to the engine): a
    memory_service.contract.MemoryConnection whose step is applied at send."""

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
