"""What a compute replica knows of its own prefix cache (a PrefixIndex: this one with prefix
caching on, NoPrefixIndex with it off; compute_service.kv_manager holds one): the block hashes of its sequences, the
blocks it has committed (made matchable), and which prefixes it is computing right now.

The memory service decides hits (it may have evicted a block since); this view only serves the
scheduler's plans: which blocks to commit after their forward ran, which waiting prompts to hold
until a prefix being computed is committed, and how many tokens an admission will probably not
have to compute (for the step's token budget; the block estimate still assumes no hit).
No tensors, no RPC.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from common.block_hash import extend_block_hashes, num_leading, root_hash
from compute_service.sequence import Sequence
from memory_service.contract import Commit


class PrefixIndex(Protocol):
    shares_blocks: bool  # whether sequences of different requests can hold the same block

    def hashes(self, seq: Sequence) -> list[bytes]: ...

    def lookup(self, seq: Sequence) -> list[bytes]: ...

    def commit(self, seq: Sequence) -> Commit | None: ...

    def estimated_hit_tokens(self, seq: Sequence) -> int: ...

    def being_computed(self, running: list[Sequence]) -> set[bytes]: ...

    def forget(self) -> None: ...


class NoPrefixIndex:
    """Prefix caching off: nothing is hashed, committed or found."""

    shares_blocks = False

    def hashes(self, seq: Sequence) -> list[bytes]:
        return []

    def lookup(self, seq: Sequence) -> list[bytes]:
        return []

    def commit(self, seq: Sequence) -> Commit | None:
        return None

    def estimated_hit_tokens(self, seq: Sequence) -> int:
        return 0

    def being_computed(self, running: list[Sequence]) -> set[bytes]:
        return set()

    def forget(self) -> None:
        pass


class PrefixCacheView:
    shares_blocks = True

    def __init__(self, block_size: int, namespace: str, capacity_blocks: int) -> None:
        self.block_size = block_size
        self.namespace = namespace
        self.capacity_blocks = capacity_blocks
        self._roots: dict[str, bytes] = {}  # cache_salt -> root hash
        self._committed: OrderedDict[bytes, None] = OrderedDict()  # most recently used last; at most the pool

    def hashes(self, seq: Sequence) -> list[bytes]:
        """The sequence's full-block hashes, extended to its tokens so far."""
        salt = seq.params.cache_salt
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = root_hash(self.namespace, salt)
        return extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, root)

    def lookup(self, seq: Sequence) -> list[bytes]:
        """The hashes an admission looks up: every full block but the one holding the last token."""
        return self.hashes(seq)[: (seq.num_tokens - 1) // self.block_size]

    def commit(self, seq: Sequence) -> Commit | None:
        """The sequence's full blocks written by forwards that have run and not matchable yet."""
        if not seq.block_table:
            return None
        end = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if end <= seq.num_committed_blocks:
            return None
        hashes = self.hashes(seq)[seq.num_committed_blocks : end]
        commit = Commit(seq.request_id, seq.num_committed_blocks, hashes)
        seq.num_committed_blocks = end
        for block_hash in hashes:
            self._remember(block_hash)
        return commit

    def estimated_hit_tokens(self, seq: Sequence) -> int:
        """Leading tokens of the prompt this replica committed lately (the memory side may have
        evicted some since: its answer is the truth)."""
        lookup = self.lookup(seq)
        hits = num_leading(lookup, self._committed)
        for block_hash in lookup[:hits]:
            self._committed.move_to_end(block_hash)
        return hits * self.block_size

    def being_computed(self, running: list[Sequence]) -> set[bytes]:
        """Hashes of blocks running sequences hold and have not committed yet (their forward is
        in flight or was just planned): a prompt that starts with one of them waits for it."""
        computing: set[bytes] = set()
        for seq in running:
            computing.update(seq.block_hashes[seq.num_committed_blocks :])
        return computing

    def forget(self) -> None:
        """The pool is gone (memory service restarted): nothing is cached any more."""
        self._committed.clear()

    def _remember(self, block_hash: bytes) -> None:
        self._committed[block_hash] = None
        self._committed.move_to_end(block_hash)
        while len(self._committed) > self.capacity_blocks:
            self._committed.popitem(last=False)
