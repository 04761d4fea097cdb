"""A memory step is atomic: a malformed request (unknown, freed-twice, duplicate or repeated ids,
bad counts) raises and changes nothing; a well-formed one is applied whole. Hypothesis draws
requests from a pool of ids that mixes live, freed and never-seen sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memory_service.block_allocator import BlockAllocator, BlockAllocatorError
from memory_service.contract import Allocation, StepRequest
from memory_service.step import apply_step

IDS = [f"s{i}" for i in range(8)]


def snapshot(alloc: BlockAllocator) -> tuple:
    """Everything a step can change, the order of the free list included (it decides which
    blocks the next allocation gets)."""
    tables = {s: (alloc.block_table(s), alloc.num_tokens(s)) for s in alloc.sequence_ids()}
    return tables, list(alloc._free), [alloc.ref_count(b) for b in range(alloc.num_blocks)], alloc.stats()


def allocator_with(live: list[tuple[str, int]]) -> BlockAllocator:
    alloc = BlockAllocator(num_blocks=24, block_size=4)
    for seq_id, tokens in live:
        apply_step(alloc, StepRequest(allocate=[Allocation(seq_id, tokens)]))
    return alloc


requests = st.builds(
    StepRequest,
    free=st.lists(st.sampled_from(IDS), max_size=3),
    allocate=st.lists(
        st.builds(Allocation, st.sampled_from(IDS), st.integers(-1, 20), st.sampled_from([0, 0, 24])), max_size=3
    ),
    append=st.lists(st.tuples(st.sampled_from(IDS), st.integers(0, 6)), max_size=4),
)
live_sequences = st.lists(
    st.tuples(st.sampled_from(IDS), st.integers(1, 12)), max_size=5, unique_by=lambda item: item[0]
)


def expected_malformed(alloc: BlockAllocator, request: StepRequest) -> bool:
    """The rule, written independently of check_step: ids must make sense in the step's order."""
    live = set(alloc.sequence_ids())
    if len(set(request.free)) < len(request.free) or not set(request.free) <= live:
        return True
    live -= set(request.free)
    new = [a.seq_id for a in request.allocate]
    if (
        len(set(new)) < len(new)
        or set(new) & live
        or any(a.num_tokens <= 0 or a.reserve_tokens < 0 for a in request.allocate)
    ):
        return True
    grown = [s for s, _ in request.append]  # only sequences that existed before this step's allocations
    return len(set(grown)) < len(grown) or not set(grown) <= live or any(n <= 0 for _, n in request.append)


@settings(max_examples=400, deadline=None)
@given(live=live_sequences, request=requests)
def test_a_rejected_step_changes_nothing_and_an_accepted_one_is_applied_whole(live, request):
    alloc = allocator_with(live)
    before, malformed = snapshot(alloc), expected_malformed(alloc, request)
    try:
        response = apply_step(alloc, request)
    except (BlockAllocatorError, ValueError):
        assert malformed, "a well-formed step was refused"
        assert snapshot(alloc) == before, "a refused step changed the allocator"
        return
    assert not malformed, "a malformed step was applied"
    rejected = set(response.rejected)
    for seq_id in request.free:
        assert seq_id not in rejected and (
            not alloc.has_sequence(seq_id) or seq_id in {a.seq_id for a in request.allocate}
        )
    for a in request.allocate:
        assert alloc.has_sequence(a.seq_id) == (a.seq_id not in rejected)
    assert response.stats == alloc.stats()


def test_the_old_failure_a_free_before_an_unknown_append_is_not_applied():
    alloc = allocator_with([("a", 8)])
    before = snapshot(alloc)
    try:
        apply_step(alloc, StepRequest(free=["a"], append=[("ghost", 1)]))
    except BlockAllocatorError:
        pass
    assert snapshot(alloc) == before and alloc.has_sequence("a")
