"""BlockAllocator: the PagedAttention block bookkeeping, with no tensors in it.

A sequence's KV cache lives in fixed-size blocks of one shared pool. This module only decides
*which* physical blocks a sequence owns (its block table); the compute side holds the tensors
and writes token k/v into `block_id * block_size + offset`.

Blocks are shared through the prefix cache (memory_service.prefix_cache): a full block whose
content hash the compute side committed can be matched by a later admission with the same prefix
(the samples of a request with n > 1 share their prompt this way), and when nobody references it
any more it is parked, not freed, until a new block is needed and it is the least recently
released.

Invariants (checked by tests/test_block_allocator_state_machine.py after every operation):
- every block is either free (never cached, or parked in the cache) or referenced, never both;
- a block's ref count equals the number of block tables holding it;
- a shared block (ref count > 1) is never written: only full blocks are shared (a hit never
  includes the block holding a prompt's last token), and appends go past them;
- a cached (hashed) block is full and never written; it loses its hash only when evicted.
Every public mutation checks before it changes anything, so a failed call changes nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from common.blocks import blocks_to_admit, new_blocks_to_append
from memory_service.block_events import (
    AllBlocksCleared,
    Allocate,
    Append,
    BlockEvent,
    BlockRemoved,
    BlockStored,
    Evict,
    Free,
    Preempt,
)
from memory_service.contract import AllocatorStats, SeqId
from memory_service.prefix_cache import PrefixCache


class BlockAllocatorError(Exception):
    """Base class for bookkeeping errors a caller can cause."""


class OutOfBlocksError(BlockAllocatorError):
    """Not enough free blocks; the caller should wait or preempt."""


class UnknownSequenceError(BlockAllocatorError, KeyError):
    """The sequence id has no block table (never allocated, or already freed)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateSequenceError(BlockAllocatorError):
    """The sequence id already has a block table."""


@dataclass
class _SeqState:
    block_table: list[int]
    num_tokens: int
    num_hit_tokens: int = 0  # tokens found in the prefix cache at admission


class BlockAllocator:
    """Owns the free list, ref counts and every sequence's block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # free and holding nothing cached
        self._ref_counts = [0] * num_blocks
        self._filled = [0] * num_blocks  # token slots written in each block
        self._tokens_stored = 0
        self._seqs: dict[SeqId, _SeqState] = {}
        self.cache = PrefixCache()
        # Told every change to a block (memory_service.block_events; the recorder is
        # memory_service.events); None = nobody listens.
        self.listener: Callable[[BlockEvent], None] | None = None
        self.step = 0  # the engine step being applied (memory_service.step sets it): events carry it

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached ones, then parked cached ones (evicted)."""
        return len(self._free) + self.cache.num_parked

    def hit_tokens(self, seq_id: SeqId) -> int:
        """Tokens of the sequence's prompt that its admission found in the prefix cache."""
        return self._state(seq_id).num_hit_tokens

    def matched_blocks(self, block_hashes: list[bytes]) -> int:
        """How many leading blocks of a prompt with these hashes this pool holds, cached or in
        use (what a router asks; an admission would take all but the one with the last token)."""
        return len(self.cache.match(block_hashes))

    def has_sequence(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: SeqId) -> list[int]:
        return list(self._state(seq_id).block_table)

    def num_tokens(self, seq_id: SeqId) -> int:
        return self._state(seq_id).num_tokens

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def sequence_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def stats(self) -> AllocatorStats:
        free = self.num_free_blocks
        return AllocatorStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_free_blocks=free,
            num_used_blocks=self.num_blocks - free,
            num_tokens_stored=self._tokens_stored,
            num_sequences=len(self._seqs),
            num_cached_blocks=self.cache.num_parked,
            prefix_query_tokens=self.cache.query_tokens,
            prefix_hit_tokens=self.cache.hit_tokens,
        )

    def blocks_needed_to_append(self, seq_id: SeqId, num_new_tokens: int = 1) -> int:
        """New blocks `append_slots` would take: the fresh blocks past the table."""
        state = self._state(seq_id)
        return new_blocks_to_append(state.num_tokens, len(state.block_table), num_new_tokens, self.block_size)

    # ---- mutations -----------------------------------------------------------------------
    def allocate(
        self, seq_id: SeqId, num_tokens: int, reserve_tokens: int = 0, block_hashes: list[bytes] = ()
    ) -> list[int]:
        """Give a new sequence blocks for its `num_tokens` prompt tokens.

        `block_hashes` (the prompt's full blocks, common.block_hash) are looked up in the prefix
        cache: the table starts with the blocks of the longest cached prefix, shared, and
        `hit_tokens(seq_id)` says how many tokens they hold. The last token is never matched
        (its logits must be computed), so at most (num_tokens - 1) // block_size blocks are.
        `reserve_tokens` > num_tokens takes blocks for that many tokens up front: the
        contiguous (pre-vLLM) policy that reserves a request's maximum length at admission.
        """
        if seq_id in self._seqs:
            raise DuplicateSequenceError(f"sequence {seq_id!r} already has a block table")
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
        hits = self.cache.match(list(block_hashes)[: (num_tokens - 1) // self.block_size])
        total = blocks_to_admit(num_tokens, reserve_tokens, self.block_size)
        needed = total - sum(1 for b in hits if self._ref_counts[b] > 0)  # a parked hit is taken from the free count
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq_id!r} needs {needed} blocks, only {self.num_free_blocks} free")
        for block in hits:  # claimed before any new block is taken, so none of them is evicted
            self._reference(block)
        table = hits + [self._take_block() for _ in range(total - len(hits))]
        hit_tokens = len(hits) * self.block_size
        self.cache.record_query(num_tokens, hit_tokens)  # a prompt shorter than a block is a query that misses
        state = _SeqState(block_table=table, num_tokens=hit_tokens, num_hit_tokens=hit_tokens)
        self._seqs[seq_id] = state
        self._fill(state, num_tokens - hit_tokens)
        if self.listener is not None:
            self.listener(Allocate(str(seq_id), list(table), len(hits), num_tokens, self._refs(table)))
        return list(table)

    def commit(self, seq_id: SeqId, first_block: int, block_hashes: list[bytes]) -> None:
        """The forward that wrote these full blocks of the sequence (logical indices from
        `first_block`) has run: make them matchable under their hashes. Blocks already cached
        (a hit, or an earlier commit) and contents another block already holds are skipped."""
        table = self.check_commit(seq_id, first_block, len(block_hashes))
        stored = [
            (table[logical], block_hash)
            for logical, block_hash in enumerate(block_hashes, first_block)
            if self.cache.register(table[logical], block_hash)
        ]
        if stored and self.listener is not None:
            self.listener(BlockStored(str(seq_id), [b for b, _ in stored], [h.hex() for _, h in stored]))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks start cold with it; vLLM has the same). Blocks in
        use stay with their tables; parked ones become plain free blocks."""
        hashed = self.cache.hashed_blocks() if self.listener is not None else []
        for block in self.cache.clear():  # the parked ones
            self._filled[block] = 0
            self._free.append(block)
        if self.listener is not None:  # every block that held a hash, in use or not
            self.listener(AllBlocksCleared(hashed))

    def check_commit(self, seq_id: SeqId, first_block: int, count: int) -> list[int]:
        state = self._state(seq_id)
        if first_block < 0 or first_block + count > state.num_tokens // self.block_size:
            raise ValueError(
                f"commit of {seq_id!r}: blocks [{first_block}, {first_block + count}) are not all "
                f"full (it holds {state.num_tokens} tokens)"
            )
        return state.block_table

    def append_slots(self, seq_id: SeqId, num_new_tokens: int = 1) -> list[int]:
        """Make room for `num_new_tokens` more tokens at the end of a sequence; returns the new
        blocks (a fresh block is taken only at a block boundary)."""
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be > 0, got {num_new_tokens}")
        state = self._state(seq_id)
        needed = self.blocks_needed_to_append(seq_id, num_new_tokens)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {needed} blocks to append, only {self.num_free_blocks} free"
            )
        new_blocks = [self._take_block() for _ in range(needed)]
        state.block_table += new_blocks
        self._fill(state, num_new_tokens)
        if new_blocks and self.listener is not None:
            self.listener(Append(str(seq_id), list(new_blocks), state.num_tokens))
        return new_blocks

    def free(self, seq_id: SeqId, reason: str = "finish") -> None:
        """Drop a sequence's table; blocks nobody else references go back to the free list.
        `reason` ("finish" or "preempt") only tells the listener why."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            raise UnknownSequenceError(f"cannot free sequence {seq_id!r}: it has no block table (double free?)")
        for block in state.block_table:
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._tokens_stored -= self._filled[block]
                if not self.cache.park(block):  # a cached block keeps its content until evicted
                    self._filled[block] = 0
                    self._free.append(block)
        if self.listener is not None:
            dropped = Preempt if reason == "preempt" else Free
            self.listener(dropped(str(seq_id), state.block_table, self._refs(state.block_table)))

    # ---- internals -----------------------------------------------------------------------
    def _refs(self, blocks: list[int]) -> list[int]:
        return [self._ref_counts[b] for b in blocks]

    def snapshot(self) -> dict:
        """Every live table and every cached (parked) block: what a block map starts from and
        what an audit checks a replayed log against."""
        return dict(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            tables={str(s): list(st.block_table) for s, st in self._seqs.items()},
            tokens={str(s): st.num_tokens for s, st in self._seqs.items()},
            cached=self.cache.parked_blocks(),
            hashed=self.cache.hashed_blocks(),
        )

    def _state(self, seq_id: SeqId) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(f"unknown sequence {seq_id!r}: no block table") from None

    def _take_block(self) -> int:
        """A block for new content: a never-cached free one first, else the least recently
        released cached one (its hash is forgotten)."""
        if self._free:
            block = self._free.popleft()
        else:
            block_hash = self.cache.hash_of(self.cache.oldest()) if self.listener is not None else None
            block = self.cache.evict()
            self._filled[block] = 0
            if block_hash is not None:
                self.listener(Evict([block]))
                self.listener(BlockRemoved([block], [block_hash.hex()]))
        assert self._ref_counts[block] == 0, f"free block {block} still referenced"
        self._ref_counts[block] = 1
        return block

    def _reference(self, block: int) -> None:
        """One more table points at a cached block (a prefix-cache hit)."""
        if self._ref_counts[block] == 0:
            self.cache.unpark(block)
            self._tokens_stored += self._filled[block]
        self._ref_counts[block] += 1

    def _fill(self, state: _SeqState, num_new_tokens: int) -> None:
        """Mark token slots written; only unshared blocks are ever filled."""
        pos = state.num_tokens
        end = pos + num_new_tokens
        while pos < end:
            logical, offset = divmod(pos, self.block_size)
            take = min(end - pos, self.block_size - offset)
            block = state.block_table[logical]
            assert self._ref_counts[block] == 1, f"write into shared block {block}"
            assert self._filled[block] == offset, f"block {block}: non-sequential write"
            self._filled[block] = offset + take
            self._tokens_stored += take
            pos += take
        state.num_tokens = end
