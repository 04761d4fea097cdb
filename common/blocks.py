"""KV block arithmetic: the one definition the allocator and the scheduler both use.

The memory service's BlockAllocator decides which blocks a sequence gets; the compute side's
scheduler plans a step before the memory side answers (admission, preemption), so it needs the
same numbers. Both call these functions, so the two sides can never disagree on how many blocks
a number of tokens takes.
"""

from __future__ import annotations


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` token slots."""
    return -(-num_tokens // block_size)


def blocks_to_admit(num_tokens: int, reserve_tokens: int, block_size: int) -> int:
    """Blocks an admission takes: its tokens, or its reservation when larger (contiguous mode)."""
    return blocks_for_tokens(max(num_tokens, reserve_tokens), block_size)


def new_blocks_to_append(num_tokens_held: int, num_blocks_held: int, num_new_tokens: int, block_size: int) -> int:
    """Fresh blocks an append of `num_new_tokens` takes past a table of `num_blocks_held`
    (only unshared blocks are ever written, so nothing comes on top)."""
    return max(0, blocks_for_tokens(num_tokens_held + num_new_tokens, block_size) - num_blocks_held)
