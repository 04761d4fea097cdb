"""Hypothesis drives the allocator with prefix-cache hits, commits, eviction and frees, against
a model of what every physical block holds (the token written in each slot).

Checked after every step: no block is both free and referenced; ref counts equal the tables that
hold a block; every slot a live table points at holds that sequence's token (so no shared or
cached block was ever overwritten under a table); every cached block holds the content its hash
names (so a hit can never hand out wrong k/v); and at the end every reference is returned.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.block_hash import prompt_block_hashes
from memory_service.block_allocator import BlockAllocator, OutOfBlocksError

NUM_BLOCKS, BS, NAMESPACE = 12, 4, "test"
BASES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5]]  # prompts share these


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(NUM_BLOCKS, BS)
        self.tokens: dict[int, list[int]] = {}  # the model: every live sequence's tokens
        self.content: dict[int, list[int | None]] = {b: [None] * BS for b in range(NUM_BLOCKS)}
        self.cached: dict[bytes, list[int]] = {}  # hash -> the tokens its block holds
        self.next_id = 0

    def _write(self, seq: int, start: int) -> None:
        """The forward: write the sequence's tokens from `start` into its own blocks."""
        table = self.alloc.block_table(seq)
        for pos in range(start, len(self.tokens[seq])):
            block = table[pos // BS]
            assert self.alloc.ref_count(block) == 1, f"write into shared block {block}"
            assert self.alloc.cache.hash_of(block) is None, f"write into cached block {block}"
            self.content[block][pos % BS] = self.tokens[seq][pos]

    @rule(
        base=st.sampled_from(range(len(BASES))), cut=st.integers(1, 9), suffix=st.lists(st.integers(0, 3), max_size=6)
    )
    def allocate(self, base, cut, suffix):
        prompt = BASES[base][:cut] + suffix
        if not prompt:
            return
        hashes = prompt_block_hashes(prompt, BS, NAMESPACE)
        try:
            table = self.alloc.allocate(self.next_id, len(prompt), block_hashes=hashes)
        except OutOfBlocksError:
            return
        hit = self.alloc.hit_tokens(self.next_id)
        assert hit % BS == 0 and hit <= len(prompt) - 1
        for i in range(hit // BS):  # a hit hands out blocks holding exactly the prompt's tokens
            assert self.content[table[i]] == prompt[i * BS : (i + 1) * BS]
        self.tokens[self.next_id] = prompt
        self._write(self.next_id, hit)
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        hashes = prompt_block_hashes(self.tokens[seq], BS, NAMESPACE)
        self.alloc.commit(seq, 0, hashes)
        for block, block_hash in zip(self.alloc.block_table(seq), hashes, strict=False):
            if self.alloc.cache.hash_of(block) == block_hash:
                self.cached[block_hash] = list(self.content[block])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def append(self, data, new):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        free_before = self.alloc.num_free_blocks
        try:
            self.alloc.append_slots(seq, len(new))
        except OutOfBlocksError:
            assert self.alloc.num_free_blocks == free_before
            return
        start = len(self.tokens[seq])
        self.tokens[seq] = self.tokens[seq] + new
        self._write(seq, start)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.alloc.free(seq)
        del self.tokens[seq]

    @invariant()
    def books_balance(self):
        holders = Counter(b for s in self.tokens for b in self.alloc.block_table(s))
        free = list(self.alloc._free)
        assert len(set(free)) == len(free), "a block is on the free list twice"
        for block in range(NUM_BLOCKS):
            parked = block in self.alloc.cache.parked_blocks()
            assert ((block in free) or parked) != (holders[block] > 0), f"block {block}: free xor referenced"
            assert not (block in free and parked)
            assert self.alloc.ref_count(block) == holders[block]
            if parked:
                assert self.alloc.cache.hash_of(block) is not None
        assert self.alloc.num_free_blocks + len(holders) == NUM_BLOCKS

    @invariant()
    def every_table_reads_its_own_tokens_and_every_cached_block_its_hash(self):
        for seq, tokens in self.tokens.items():
            table = self.alloc.block_table(seq)
            for pos, token in enumerate(tokens):
                assert self.content[table[pos // BS]][pos % BS] == token, f"seq {seq} pos {pos} overwritten"
        for block in range(NUM_BLOCKS):
            block_hash = self.alloc.cache.hash_of(block)
            if block_hash is not None:
                assert self.content[block] == self.cached[block_hash]

    def teardown(self):
        for seq in list(self.tokens):
            self.alloc.free(seq)
        stats = self.alloc.stats()
        assert stats.num_used_blocks == 0 and stats.num_free_blocks == NUM_BLOCKS
        assert stats.num_tokens_stored == 0


PrefixCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
