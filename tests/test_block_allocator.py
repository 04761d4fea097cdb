"""BlockAllocator unit tests, in the spirit of vLLM's block manager tests."""

from __future__ import annotations

import pytest

from memory_service.block_allocator import (
    BlockAllocator,
    DuplicateSequenceError,
    OutOfBlocksError,
    UnknownSequenceError,
)
from memory_service.contract import Allocation, StepRequest
from memory_service.step import apply_step


def test_allocate_takes_ceil_blocks_and_append_takes_a_block_only_at_boundaries():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    table = alloc.allocate("a", 5)
    assert len(table) == 2 and alloc.num_free_blocks == 6
    for _ in range(3):  # tokens 6, 7, 8 fit in block 2
        assert alloc.append_slots("a") == []
    assert len(alloc.append_slots("a")) == 1  # token 9 opens block 3
    assert alloc.num_tokens("a") == 9 and alloc.num_free_blocks == 5
    stats = alloc.stats()
    assert stats.num_tokens_stored == 9 and stats.utilization == pytest.approx(9 / 12)


def test_exhaustion_raises_and_changes_nothing():
    alloc = BlockAllocator(num_blocks=2, block_size=4)
    alloc.allocate("a", 8)
    before = alloc.stats()
    with pytest.raises(OutOfBlocksError):
        alloc.allocate("b", 1)
    with pytest.raises(OutOfBlocksError):
        alloc.append_slots("a")
    assert alloc.stats() == before and not alloc.has_sequence("b")
    assert alloc.num_tokens("a") == 8 and alloc.blocks_needed_to_append("a") > alloc.num_free_blocks == 0


def test_double_free_and_unknown_sequences_raise():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    alloc.allocate("a", 3)
    alloc.free("a")
    with pytest.raises(UnknownSequenceError, match="double free"):
        alloc.free("a")
    with pytest.raises(UnknownSequenceError):
        alloc.append_slots("nope")
    alloc.allocate("b", 1)
    with pytest.raises(DuplicateSequenceError):
        alloc.allocate("b", 1)
    assert alloc.num_free_blocks == 3


def test_blocks_return_to_the_free_list_in_free_order():
    alloc = BlockAllocator(num_blocks=3, block_size=2)
    a, b = alloc.allocate("a", 2), alloc.allocate("b", 2)
    alloc.free("b")
    alloc.free("a")
    assert alloc.allocate("c", 6) == [2, b[0], a[0]]


def test_reservation_takes_all_blocks_up_front_and_counts_as_unused():
    alloc = BlockAllocator(num_blocks=16, block_size=4)
    alloc.allocate("a", 3, reserve_tokens=32)
    assert alloc.num_free_blocks == 8
    assert alloc.blocks_needed_to_append("a", 20) == 0
    assert alloc.stats().utilization == pytest.approx(3 / 32)


def test_step_frees_first_then_allocates_then_appends_and_reports_rejections():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    alloc.allocate("old", 16)
    response = apply_step(alloc, StepRequest(free=["old"], allocate=[Allocation("a", 8), Allocation("b", 12)]))
    assert set(response.block_tables) == {"a"} and response.rejected == ["b"]
    response = apply_step(alloc, StepRequest(append=[("a", 1)]))
    assert len(response.block_tables["a"]) == 3 and response.stats.num_free_blocks == 1


@pytest.mark.parametrize("bad", [dict(num_blocks=0, block_size=4), dict(num_blocks=4, block_size=0)])
def test_constructor_rejects_empty_pools(bad):
    with pytest.raises(ValueError):
        BlockAllocator(**bad)
