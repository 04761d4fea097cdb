"""Hypothesis drives random allocate/append/free sequences and checks every invariant."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.blocks import blocks_to_admit
from memory_service.block_allocator import BlockAllocator, OutOfBlocksError

NUM_BLOCKS, BLOCK_SIZE = 12, 4


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
        self.lengths: dict[int, int] = {}  # the model: tokens per live sequence
        self.next_id = 0

    @rule(num_tokens=st.integers(1, 30), reserve=st.sampled_from([0, 0, 40]))
    def allocate(self, num_tokens, reserve):
        fits = blocks_to_admit(num_tokens, reserve, BLOCK_SIZE) <= self.alloc.num_free_blocks
        try:
            self.alloc.allocate(self.next_id, num_tokens, reserve)
        except OutOfBlocksError:
            assert not fits
            return
        assert fits
        self.lengths[self.next_id] = num_tokens
        self.next_id += 1

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), num_new=st.integers(1, 6))
    def append(self, data, num_new):
        seq = data.draw(st.sampled_from(sorted(self.lengths)))
        fits = self.alloc.blocks_needed_to_append(seq, num_new) <= self.alloc.num_free_blocks
        free_before = self.alloc.num_free_blocks
        try:
            new_blocks = self.alloc.append_slots(seq, num_new)
        except OutOfBlocksError:
            assert not fits and self.alloc.num_free_blocks == free_before
            return
        assert fits
        assert free_before - self.alloc.num_free_blocks == len(new_blocks)
        self.lengths[seq] += num_new

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.lengths)))
        self.alloc.free(seq)
        del self.lengths[seq]

    @invariant()
    def books_balance(self):
        holders = Counter(b for s in self.lengths for b in self.alloc.block_table(s))
        free = set(self.alloc._free)
        assert len(free) == len(self.alloc._free), "a block is on the free list twice"
        for block in range(NUM_BLOCKS):
            assert (block in free) != (holders[block] > 0), f"block {block} free xor referenced"
            assert self.alloc.ref_count(block) == holders[block]
        for seq, length in self.lengths.items():
            assert self.alloc.num_tokens(seq) == length
            assert len(self.alloc.block_table(seq)) >= -(-length // BLOCK_SIZE)
        stats = self.alloc.stats()
        assert stats.num_used_blocks == len(holders)
        assert 0 <= stats.num_tokens_stored <= stats.num_used_blocks * BLOCK_SIZE

    def teardown(self):
        for seq in list(self.lengths):
            self.alloc.free(seq)
        assert self.alloc.num_free_blocks == NUM_BLOCKS
        assert self.alloc.stats().num_tokens_stored == 0


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
