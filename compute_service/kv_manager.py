"""KVCacheManager: everything the compute side knows and asks about its KV blocks, behind one
object (in the spirit of vLLM v1's KVCacheManager), so the scheduler only decides who runs.

The memory service owns the block tables (memory_service.contract says what a step's call
carries); this object speaks that contract for the scheduler:
- prefix knowledge (`track`, `estimated_hit_tokens`, `prefix_hashes`, `being_computed`), through
  a PrefixIndex: a real one with prefix caching on, or NoPrefixIndex (caching off is a choice made
  here, once, as TGI's Allocator has a simple and a radix implementation);
- the count of free blocks (`num_free_blocks`): the memory side's count in its last answer plus
  what this replica has let go of since. It is an estimate made with the allocator's own
  arithmetic (common.blocks) so that a step is rarely wasted, never the authority: a plan never
  asks for more new blocks than it holds, and the answer says what did not fit;
- the verbs that reach memory: `commit_computed` (blocks whose forward ran become matchable),
  `free`, `send_step` (admit prompts, whose whole token count is allocated at once even when
  they are computed in chunks, and grow running sequences by the slots their next rows write),
  `flush`. At most one call is in flight: `receive` applies its answer to the sequences (block
  tables, prefix hits) and returns what did not fit, for the scheduler to requeue or preempt.
Sequences keep their own KV fields (block_table, num_slots, num_computed_tokens,
num_committed_blocks, num_hit_tokens); only this object writes them, apart from the engine
marking tokens computed after a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.blocks import blocks_to_admit, new_blocks_to_append
from compute_service.prefix_view import NoPrefixIndex, PrefixIndex
from compute_service.sequence import Sequence
from memory_service.contract import Allocation, AllocatorStats, Commit, MemoryConnection, StepRequest


@dataclass
class StepAnswer:
    """What the memory call in flight answered: the ids of the sequences whose slots did not fit
    (nothing changed for those)."""

    rejected: set[str]


class Reservation:
    """KV slots a request takes at admission beyond its tokens: 0 when paged (blocks are taken
    as tokens arrive); the contiguous baseline reserves the model's maximum length, or the
    prompt plus max_new_tokens, up front (the pre-vLLM systems the paper compares with)."""

    def __init__(self, policy: str | None = None, max_model_len: int = 0) -> None:
        self.policy = policy  # None = paged; "max-model-len" | "max-new-tokens" = contiguous
        self.max_model_len = max_model_len

    def tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        if self.policy == "max-model-len":
            return self.max_model_len
        if self.policy == "max-new-tokens":
            return prompt_len + max_new_tokens
        return 0

    def of(self, seq: Sequence) -> int:
        return self.tokens(seq.prompt_len, seq.params.max_new_tokens)


class KVCacheManager:
    def __init__(
        self,
        memory: MemoryConnection,
        num_blocks: int,
        block_size: int,
        prefix: PrefixIndex | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        self.memory = memory
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix = prefix or NoPrefixIndex()
        self.reservation = reservation or Reservation()
        self.num_calls = 0  # memory calls made (a step's number in block events)
        self.last_stats: AllocatorStats | None = None  # from the last answer
        self._num_free_blocks = num_blocks  # as the last answer counted them
        self._to_free: dict[str, int] = {}  # seq id -> blocks it returns at the next call
        self._preempted: set[str] = set()  # of those, the ones preempted (not finished)
        self._commits: list[Commit] = []  # written blocks made matchable by the next call
        self._awaiting: dict[str, Sequence] | None = None  # whose slots the call in flight asks for
        self._admitting: set[str] = set()  # of those, the ones it admits

    # ---- prefix knowledge ----------------------------------------------------------------
    def track(self, seq: Sequence) -> None:
        """A new sequence: hash its full blocks (prefix caching) for lookups and commits."""
        self.prefix.hashes(seq)

    def prefix_hashes(self, seq: Sequence) -> list[bytes]:
        """The hashes an admission looks up: every full block but the one holding the last token."""
        return self.prefix.lookup(seq)

    def estimated_hit_tokens(self, seq: Sequence) -> int:
        """Prompt tokens the sequence will probably find cached (the answer is the truth)."""
        return self.prefix.estimated_hit_tokens(seq)

    def being_computed(self, running: list[Sequence]) -> set[bytes]:
        """Hashes of blocks running sequences are computing: prompts starting so wait for them."""
        return self.prefix.being_computed(running)

    def reset_prefix_cache(self) -> None:
        """Forget what this replica believes is cached (the memory side resets its own)."""
        self.prefix.forget()

    # ---- the count -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Free blocks as the next call will find them (the last answer's, plus pending frees)."""
        return self._num_free_blocks + sum(self._to_free.values())

    def blocks_to_admit(self, seq: Sequence) -> int:
        """Blocks the sequence's admission takes, counted as if nothing were cached."""
        return blocks_to_admit(seq.num_tokens, self.reservation.of(seq), self.block_size)

    def fits_pool(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether a request of this size can ever be held by the whole pool."""
        longest = prompt_len + max_new_tokens
        reserve = self.reservation.tokens(prompt_len, max_new_tokens)
        return blocks_to_admit(longest, reserve, self.block_size) <= self.num_blocks

    def slots_to_grow(self, seq: Sequence, upto: int) -> int:
        """Slots the sequence's table must gain so that its first `upto` tokens have one (0 for
        a prompt's chunks: the admission asked for the whole prompt; 1 for a decode)."""
        return max(0, upto - seq.num_slots)

    def blocks_to_grow(self, seq: Sequence, upto: int) -> int:
        """Fresh blocks that growth takes (every answer is in when a step is planned, so the table
        and the slot count the sequence holds are the memory side's)."""
        return new_blocks_to_append(seq.num_slots, len(seq.block_table), self.slots_to_grow(seq, upto), self.block_size)

    def private_blocks(self, seq: Sequence, running: list[Sequence]) -> int:
        """Blocks that come back to the free count when the sequence lets go of its table: those
        no other running sequence's table holds (a shared cached prefix stays taken; a cached
        block nobody else holds is parked, which counts as free). Tables still in flight are not
        seen (an admission that hit this sequence's prefix in the call now travelling): then
        the count is high by those blocks, and the memory side rejects what does not fit; its
        answer brings the true count."""
        if not self.prefix.shares_blocks:
            return len(seq.block_table)
        others = {block for s in running if s is not seq for block in s.block_table}
        return sum(1 for block in seq.block_table if block not in others)

    # ---- verbs that reach memory ---------------------------------------------------------
    def commit_computed(self, running: list[Sequence]) -> None:
        """Every running sequence's full blocks that finished forwards wrote become matchable
        from the next call on (so the admission it carries can already count on them)."""
        self._commits += [c for c in map(self.prefix.commit, running) if c is not None]

    def free(self, seq: Sequence, running: list[Sequence], preempted: bool = False) -> None:
        """The sequence gives its blocks back at the next call (what it wrote is committed first)."""
        commit = self.prefix.commit(seq)
        if commit is not None:
            self._commits.append(commit)
        self._to_free[seq.request_id] = self.private_blocks(seq, running)
        if preempted:
            self._preempted.add(seq.request_id)
        self.drop(seq)

    def drop(self, seq: Sequence) -> None:
        """Forget the sequence's table here without freeing it (it never had one, or the pool
        that held it is gone)."""
        seq.block_table = []
        seq.num_slots = 0
        seq.num_committed_blocks = 0

    def send_step(self, admit: list[Sequence], grow: dict[Sequence, int], num_waiting: int) -> None:
        """One step's call: allocate the admitted sequences' tokens (their cached prefix is looked
        up) and grow running ones so their first `grow[seq]` tokens have slots. Counted as held
        from now on; a rejection preempts or requeues the sequence, which drops the count."""
        allocate = [Allocation(s.request_id, s.num_tokens, self.reservation.of(s), list(s.block_hashes)) for s in admit]
        append = []
        for seq, upto in grow.items():
            if (num_new := self.slots_to_grow(seq, upto)) > 0:
                append.append((seq.request_id, num_new))
                seq.num_slots += num_new
        for seq in admit:
            seq.num_slots = seq.num_tokens
        self._send(StepRequest(allocate=allocate, append=append), [*admit, *grow], num_waiting)
        self._admitting = {s.request_id for s in admit}

    def flush(self, running: list[Sequence], num_waiting: int) -> bool:
        """Commit and free what is pending now, in a call of its own (nothing else to run).
        False when there was nothing to send. Only with no call in flight."""
        self.commit_computed(running)
        if not (self._to_free or self._commits):
            return False
        self._send(StepRequest(), [], num_waiting)
        self.receive()
        return True

    @property
    def in_flight(self) -> bool:
        return self._awaiting is not None

    def has_pending(self) -> bool:
        """Blocks wait to be freed at the next call, or a call is in flight."""
        return bool(self._to_free) or self.in_flight

    def in_flight_ids(self) -> set[str]:
        """Sequences whose next step's slots are asked for but not yet known here."""
        return set(self._awaiting or ())

    def _send(self, request: StepRequest, seqs: list[Sequence], num_waiting: int) -> None:
        request.commit, self._commits = self._commits, []
        request.free, self._to_free = list(self._to_free), {}
        request.preempted = [seq_id for seq_id in request.free if seq_id in self._preempted]
        self._preempted.difference_update(request.free)
        request.num_waiting = num_waiting  # the replica's load, for routers asking the memory service
        request.step = self.num_calls + 1  # this replica's step number (from 1), as its block events show it
        self.memory.send(request)
        self.num_calls += 1
        self._awaiting = {s.request_id: s for s in seqs}
        self._admitting = set()

    def receive(self) -> StepAnswer:
        """Apply the answer to the call in flight to its sequences."""
        awaiting, admitting = self._awaiting or {}, self._admitting
        self._awaiting, self._admitting = None, set()
        response = self.memory.receive()
        self._num_free_blocks = response.stats.num_free_blocks
        self.last_stats = response.stats
        for seq_id, table in response.block_tables.items():
            seq = awaiting[seq_id]
            if seq.is_finished:  # ended while its call was in flight: free what it got
                if seq_id in admitting:  # the whole table is news; its cached prefix is shared
                    shared = response.hit_tokens.get(seq_id, 0) // self.block_size
                    self._to_free[seq_id] = max(len(table) - shared, 0)
                else:  # free() counted the table it knew; the block this answer may add is not counted
                    self._to_free.setdefault(seq_id, 0)
                continue
            seq.block_table = table
            if seq_id in admitting:  # the prompt's cached prefix is not computed again
                seq.num_hit_tokens = response.hit_tokens.get(seq_id, 0)
                seq.num_computed_tokens = seq.num_hit_tokens
                seq.num_committed_blocks = seq.num_hit_tokens // self.block_size
        return StepAnswer(set(response.rejected))

    def forget(self) -> None:
        """The memory side lost this pool: every table is void (the scheduler has dropped them),
        and so are the call in flight, pending frees and commits, and what was cached."""
        self._awaiting = None
        self._to_free.clear()
        self._preempted.clear()
        self._commits.clear()
        self.prefix.forget()
        self._num_free_blocks = self.num_blocks
        self.last_stats = None
