"""Which waiting sequences a step admits: the scheduler's admission policy, with no tensors and
no RPC (compute_service.scheduler owns the queues; this decides who leaves the waiting queue, asking
compute_service.kv_manager what blocks and cached prefixes there are).

In queue order, as many as fit: running sequences at most,
what the running sequences left of the step's token budget (with chunked prefill the step's first
admission takes whatever is left, as a first chunk; a later one must fit whole, or with a full
chunk when it is longer than a chunk: a prompt is not cut just to fill the rest of a step, since
that chunk would finish nothing now and lengthen the step for the prompts that do finish in it;
without chunking, all of its uncached tokens), and free blocks counted as
if nothing were cached (a prompt's blocks are all taken at admission, even when it is computed
in chunks), keeping headroom for the running sequences to grow. With prefix caching, SGLang's
longest-prefix-first idea in a starvation-free form: prompts this replica has a cached prefix for
go first and alone in their step, and the next admission is in plain queue order; a prompt whose
prefix another sequence is computing right now waits for its commit (it will hit then).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from compute_service.kv_manager import KVCacheManager
from compute_service.sequence import Sequence

if TYPE_CHECKING:
    from compute_service.scheduler import SchedulerConfig

MAX_SCAN = 256  # waiting sequences an admission considers (from the front of the queue)


class Admission:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.holding = False  # the last admission held prompts back for a prefix being computed
        self.took_hits_only = False  # the last admission preferred prompts with a cached prefix

    def admit(
        self, waiting: deque[Sequence], running: list[Sequence], free_blocks: int, num_running: int, token_budget: int
    ) -> dict[Sequence, int]:
        """Waiting sequences to admit now, each with the tokens its first step computes (a likely
        cached prefix left out; with chunked prefill, its first chunk). With prefix caching, as
        SGLang's longest-prefix-first policy does: prompts whose prefix this replica has cached go
        first, and a step that takes some takes no cold prompt (a cold prompt's long prefill would
        delay every cheap one in the step); the next admission is in plain queue order, so cold
        prompts are never starved. Prompts whose prefix another sequence is computing right now
        wait for its commit. Admitted sequences leave `waiting`; the others keep their places."""
        candidates = [waiting[i] for i in range(min(len(waiting), MAX_SCAN))] if token_budget > 0 else []
        if num_running and candidates:  # a full pool (the usual case under load) costs no hashing
            smallest = min(self.kv.blocks_to_admit(s) for s in candidates)
            if free_blocks - smallest < self._headroom(num_running + 1) or num_running >= self.config.max_num_seqs:
                self.holding = False
                return {}
        kv, block_size = self.kv, self.kv.block_size
        computing = kv.being_computed(running) if candidates else set()
        held = {id(s) for s in candidates if computing and any(h in computing for h in kv.prefix_hashes(s))}
        hits = {id(s): kv.estimated_hit_tokens(s) for s in candidates}
        self.holding = bool(held)
        admitted: dict[Sequence, int] = {}
        if any(hits.values()) and not self.took_hits_only:
            warm = [s for s in candidates if hits[id(s)] and id(s) not in held]
            admitted = self._take(warm, hits, free_blocks, num_running, token_budget)
        self.took_hits_only = bool(admitted)
        if not admitted:
            admitted = self._take(
                [s for s in candidates if id(s) not in held], hits, free_blocks, num_running, token_budget
            )
        taken = {id(s) for s in admitted}
        if taken:
            remaining = [s for s in waiting if id(s) not in taken]
            waiting.clear()
            waiting.extend(remaining)
        if not held:  # prompts held for a prefix one admitted now computes
            for seq in admitted:
                computing.update(kv.prefix_hashes(seq)[hits[id(seq)] // block_size :])
            self.holding = bool(computing) and any(  # nothing computing (caching off): nobody waits
                h in computing for s in candidates if id(s) not in taken for h in kv.prefix_hashes(s)
            )
        return admitted

    def _take(
        self, candidates: list[Sequence], hits: dict[int, int], free_blocks: int, num_running: int, token_budget: int
    ) -> dict[Sequence, int]:
        """The longest run of candidates, in order, that fits, with the tokens each computes: sequences,
        the token budget (tokens to compute: less a likely cached prefix, at most a chunk; the
        first admission is cut to what is left, a later one must fit) and free blocks
        (counted as if nothing were cached), keeping headroom for the running ones to grow."""
        admitted: dict[Sequence, int] = {}
        num_tokens = 0
        computing: set[bytes] = set()
        for seq in candidates:
            lookup = self.kv.prefix_hashes(seq)
            if any(h in computing for h in lookup):
                continue  # shares a prefix with one admitted in this step: next time, it hits
            if num_running + 1 > self.config.max_num_seqs:
                break
            to_compute = max(1, seq.num_tokens - hits.get(id(seq), 0))
            if self.config.chunked_prefill:
                to_compute = min(to_compute, self.config.chunk_cap)  # what it computes in a step with room
                if to_compute > token_budget - num_tokens:
                    if admitted:
                        break  # not cut to fill the rest: it runs whole (or a full chunk) in the next step
                    to_compute = token_budget  # the step's first admission: what the running rows left
            elif num_tokens + to_compute > token_budget:
                break
            needed = self.kv.blocks_to_admit(seq)
            if free_blocks - needed < self._headroom(num_running + 1) and (num_running or admitted):
                break
            if needed > free_blocks:
                break
            admitted[seq] = to_compute
            free_blocks -= needed
            num_tokens += to_compute
            num_running += 1
            computing.update(lookup[hits.get(id(seq), 0) // self.kv.block_size :])
        return admitted

    def _headroom(self, num_running: int) -> int:
        """Blocks kept free at admission so `num_running` sequences can grow."""
        return self.config.watermark_blocks + self.config.headroom_blocks_per_seq * num_running
