"""The prefix cache of one pool: which full blocks hold which content hash, and which of them
nobody references any more (kept, evictable, least recently released first).

Bookkeeping only, driven by the BlockAllocator: it owns ref counts and tables; this owns the
hash <-> block maps and the LRU of parked blocks. A block gets a hash only when the compute side
reports the forward that wrote it has run (`BlockAllocator.commit`), so a match is never a block
whose slots are unwritten. The hashes are common.block_hash's.
"""

from __future__ import annotations

from collections import OrderedDict

from common.block_hash import num_leading


class PrefixCache:
    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._parked: OrderedDict[int, None] = OrderedDict()  # ref count 0, still matchable: LRU first
        self.query_tokens = 0  # prompt tokens looked up (admissions that brought hashes)
        self.hit_tokens = 0  # of those, found cached

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def hash_of(self, block: int) -> bytes | None:
        return self._hash_of.get(block)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of `hashes` (stops at the first miss)."""
        return [self._block_of[h] for h in hashes[: num_leading(hashes, self._block_of)]]

    def register(self, block: int, block_hash: bytes) -> bool:
        """Make a written full block matchable. False (nothing changes) when the block already
        has a hash or another block already holds this content: the first copy stays the cached
        one, and this block is freed as usual when its sequence ends (vLLM does the same)."""
        if block in self._hash_of or block_hash in self._block_of:
            return False
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def park(self, block: int) -> bool:
        """Its last reference is gone: keep it cached if it has a hash (True), else the caller
        frees it (False)."""
        if block not in self._hash_of:
            return False
        self._parked[block] = None  # most recently released: evicted last
        return True

    def oldest(self) -> int:
        """The parked block `evict` would take next."""
        return next(iter(self._parked))

    def parked_blocks(self) -> list[int]:
        """Cached blocks nobody references, least recently released first (a snapshot's `cached`)."""
        return list(self._parked)

    def hashed_blocks(self) -> list[int]:
        """Every block holding a hash, referenced or parked (a snapshot's `hashed`)."""
        return list(self._hash_of)

    def unpark(self, block: int) -> None:
        """A parked block is referenced again (a cache hit)."""
        del self._parked[block]

    def evict(self) -> int:
        """The least recently released parked block, its hash forgotten: ready for new content."""
        block, _ = self._parked.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block

    def clear(self) -> list[int]:
        """Forget every hash; returns the parked blocks (now plain free blocks for the caller)."""
        parked = list(self._parked)
        self._parked.clear()
        self._block_of.clear()
        self._hash_of.clear()
        return parked

    def record_query(self, query_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens
