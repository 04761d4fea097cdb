"""Who runs each step: continuous batching with all-or-nothing preemption by recompute.

No tensors here. Each step is either a prefill of newly admitted sequences (prefill first, as
vLLM v0 and nano-vllm do) or one decode token for every running sequence. The scheduler keeps
its own count of free blocks (the memory side's count in its last answer, plus the blocks this
call frees), decides admissions and preemptions with it, and makes exactly one batched memory
call per step. The count is an estimate made with the allocator's own arithmetic
(common.blocks) so that a step is rarely wasted; it is never the authority. It is conservative
in that a plan never asks for more new blocks than the count holds; the memory side's answer is
the truth, and what it rejects is requeued (an admission) or preempted (an append) here.

The call is pipelined one step ahead (vLLM's async scheduling): `plan_next(batch)` sends the
next step's request while `batch`'s forward runs, assuming every sequence in it gets one more
token; `schedule()` reads the answer. A sequence that ends by EOS or a stop string in between
had one slot asked for it in vain: its blocks go back one call later. One that ends by length is
foreseen and asks for nothing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from common.blocks import new_blocks_to_append
from compute_service.admission import Admission
from compute_service.prefix_view import PrefixCacheView
from compute_service.sequence import FinishReason, Sequence, SequenceStatus
from memory_service.block_allocator import AllocatorStats
from memory_service.step import Allocation, Commit, MemoryConnection, StepRequest


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_model_len: int = 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    watermark_blocks: int = 1  # kept free at admission so running sequences can grow
    headroom_blocks_per_seq: int = 0  # and this many more per running sequence (fewer recomputes)
    reserve: str | None = None  # None = paged; "max-model-len" or "max-new-tokens" = contiguous
    prefix_caching: bool = False
    cache_namespace: str = ""  # the model and weights the KV was computed with (hashed into every block)


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Plan:
    """The step whose memory request is in flight: what it will run once the answer is in."""

    is_prefill: bool
    seqs: list[Sequence]
    forks: list[Sequence] = field(default_factory=list)  # samples forked off the admitted ones


class Scheduler:
    def __init__(self, config: SchedulerConfig, memory: MemoryConnection | None) -> None:
        """`memory` takes the step calls; None means no KV cache (the no-cache mode)."""
        self.config = config
        self.memory = memory
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self.num_schedule_rounds = 0  # schedule()/flush_frees() rounds that talked to memory
        self.num_memory_calls = 0
        self.last_stats: AllocatorStats | None = None
        self._num_free_blocks = config.num_blocks
        self._to_free: dict[str, int] = {}  # seq id -> blocks it returns at the next memory call
        self._preempted: set[str] = set()  # of those, the ones preempted (not finished)
        self._commits: list[Commit] = []  # blocks of sequences that left, cached before they are freed
        self._in_flight: _Plan | None = None
        self.prefix = (
            PrefixCacheView(config.block_size, config.cache_namespace, config.num_blocks)
            if config.prefix_caching
            else None
        )
        self.admission = Admission(config, self.prefix, self._reserve)

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.prefix is not None:
            self.prefix.hashes(seq)
        self.waiting.append(seq)

    def _collect_commits(self) -> None:
        """Every running sequence's blocks that finished forwards wrote: matchable from the next
        memory call on (so the admission that call carries can already count on them)."""
        if self.prefix is not None:
            self._commits += [c for c in map(self.prefix.commit, self.running) if c is not None]

    def _take_commits(self) -> list[Commit]:
        """The commits the next memory call carries (sequences that left, and _collect_commits)."""
        commits, self._commits = self._commits, []
        return commits

    def _release(self, seq: Sequence) -> None:
        """The sequence gives its blocks back at the next call (what it wrote is cached first)."""
        commit = self.prefix.commit(seq) if self.prefix is not None else None
        if commit is not None:
            self._commits.append(commit)
        self._to_free[seq.request_id] = self._private_blocks(seq)
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.shares_last_block = False

    def _private_blocks(self, seq: Sequence) -> int:
        """Blocks that come back to the free count when the sequence lets go of its table: those
        no other running sequence's table holds (a shared cached prefix, a forked request's
        prompt blocks stay taken; a cached block nobody else holds is parked, which counts as
        free). Samples not forked off it yet share all of it. Tables still in flight are not
        seen (an admission that hit this sequence's prefix in the request now travelling): then
        the count is high by those blocks, and the memory side rejects what does not fit (the
        scheduler requeues or preempts it); its answer brings the true count."""
        if any(not child.is_finished for child in seq.forks):
            return 0
        if self.prefix is None and seq.params.n == 1:
            return len(seq.block_table)
        others = {block for s in self.running if s is not seq for block in s.block_table}
        return sum(1 for block in seq.block_table if block not in others)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence now; its blocks go back in the next memory call."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:  # (a sample not forked yet is in neither list)
            self.waiting.remove(seq)
        if seq.block_table:
            self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()

    def flush_frees(self) -> None:
        """Hand finished sequences' blocks back now (called when nothing else is left to run)."""
        if self._in_flight is not None:
            self._receive()  # only finished sequences can be in it now: they join _to_free
        if (self._to_free or self._commits) and self.memory is not None:
            self.num_schedule_rounds += 1
            self._collect_commits()
            self._send(StepRequest(commit=self._take_commits(), free=self._take_frees()), _Plan(False, []))
            self._receive()

    def _take_frees(self) -> list:
        """The ids this call frees (their blocks were counted as free when it was planned)."""
        ids, self._to_free = list(self._to_free), {}
        return ids

    def _take_preempted(self, freed: list) -> list:
        """Of the ids a call frees, those freed by preemption (block events tell them apart)."""
        preempted = [seq_id for seq_id in freed if seq_id in self._preempted]
        self._preempted.difference_update(freed)
        return preempted

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free or self._in_flight)

    def in_flight_ids(self) -> set:
        """Sequences whose next step's slots are asked for but not yet known here."""
        return {s.request_id for s in (*self._in_flight.seqs, *self._in_flight.forks)} if self._in_flight else set()

    def reserve_tokens(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV slots a request takes at admission in contiguous mode (0 = paged, grow as needed)."""
        if self.config.reserve == "max-model-len":
            return self.config.max_model_len
        if self.config.reserve == "max-new-tokens":
            return prompt_len + max_new_tokens
        return 0

    def _reserve(self, seq: Sequence) -> int:
        return self.reserve_tokens(seq.prompt_len, seq.params.max_new_tokens)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """This step's batch: the answer to the request plan_next() sent during the last
        forward, or (nothing in flight, or all of it finished meanwhile) a call made now."""
        if self.memory is None:
            return self._schedule_without_cache()
        self.num_schedule_rounds += 1
        batch = self._receive() if self._in_flight is not None else None
        if batch is None and self._plan(ahead=set()):
            batch = self._receive()
        return batch

    def plan_next(self, batch: ScheduledBatch) -> None:
        """Send the next step's memory request now, as if `batch` had run: it travels while
        `batch`'s forward does. Only called with nothing in flight. Not after a prefill that
        prompts are held back for: planned after it ran, the next step can admit them with the
        prefix it computed (a round trip of under a millisecond next to a prefill's forward)."""
        if batch.is_prefill and self.admission.holding:
            return
        if self.memory is not None:
            self._plan(ahead={s.request_id for s in batch.seqs} | {f.request_id for s in batch.seqs for f in s.forks})

    def _plan(self, ahead: set) -> bool:
        """Decide the next step and send its request; `ahead` = sequences gaining a token before
        it runs. False when there is nothing to run (queued frees then wait for the next call)."""
        self._collect_commits()
        free_blocks = self._num_free_blocks + sum(self._to_free.values())
        going_on = [s for s in self.running if not self._ends_by_length(s, ahead)]
        admitted = self.admission.admit(self.waiting, self.running, free_blocks, len(going_on))
        if admitted:
            forks: list[tuple[Sequence, Sequence]] = []
            for seq in admitted:
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                for child in seq.forks:  # n > 1: the other samples share its blocks from the start
                    if not child.is_finished:
                        child.status = SequenceStatus.RUNNING
                        self.running.append(child)
                        forks.append((seq, child))
            caching = self.prefix is not None
            allocs = [
                Allocation(s.request_id, s.num_tokens, self._reserve(s), list(s.block_hashes) if caching else [])
                for s in admitted
            ]
            request = StepRequest(
                commit=self._take_commits(),
                free=self._take_frees(),
                allocate=allocs,
                fork=[(parent.request_id, child.request_id) for parent, child in forks],
            )
            self._send(request, _Plan(True, admitted, [child for _, child in forks]))
            return True
        needs = {s.request_id: self._needs_new_block(s, ahead) for s in going_on}
        new_blocks = sum(needs.values())
        while going_on and new_blocks > free_blocks:
            victim = going_on.pop()  # the last admitted; if its forward is in flight, that forward
            free_blocks += self._private_blocks(victim)  # still writes these blocks, which no one reads
            new_blocks -= needs[victim.request_id]
            self._preempt(victim)
        if not going_on:
            return False
        append = [(s.request_id, 1) for s in going_on]
        self._send(
            StepRequest(commit=self._take_commits(), free=self._take_frees(), append=append), _Plan(False, going_on)
        )
        return True

    def _needs_new_block(self, seq: Sequence, ahead: set) -> int:
        """Blocks the sequence's next slot takes (0 or 1). The slots it holds: its cached tokens,
        plus the one already asked for if it is in the step whose forward is in flight. A sample
        that still shares its last block with the others takes one either way (copy or new)."""
        if seq.shares_last_block:
            return 1
        held = seq.num_tokens if seq.request_id in ahead else seq.num_cached_tokens
        return new_blocks_to_append(held, len(seq.block_table), 1, self.config.block_size)

    def _ends_by_length(self, seq: Sequence, ahead: set) -> bool:
        return seq.request_id in ahead and len(seq.output_token_ids) + 1 >= seq.params.max_new_tokens

    def forget_memory(self) -> int:
        """The memory side lost this pool (it restarted, or the lease ran out): every block table
        is void, and so is the request in flight. Every running sequence goes back to the front of
        the queue, in admission order, to be recomputed in the new pool, as after a preemption (its
        tokens do not change). Returns how many were running."""
        self._in_flight = None
        for seq in [*self.running, *self.waiting]:
            for child in seq.forks:  # forked in the lost pool before its prefill ran: fork it again
                if child in self.waiting:  # (preempted before its first token was drawn)
                    self.waiting.remove(child)
                self._unfork(child)
        running = list(self.running)
        for seq in reversed(running):  # the last admitted first: they end up at the front in order
            self._preempt(seq)
        self._to_free.clear()  # the old pool is gone, and its blocks with it: nothing to free
        self._preempted.clear()
        self._commits.clear()
        if self.prefix is not None:
            self.prefix.forget()
        self._num_free_blocks = self.config.num_blocks
        self.last_stats = None
        return len(running)

    def _preempt(self, seq: Sequence) -> None:
        """All or nothing: drop every cached token; the sequence is recomputed from the front
        (with prefix caching, its committed blocks stay cached until evicted: it may hit them)."""
        self._release(seq)
        self._preempted.add(seq.request_id)
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(seq)

    def _unfork(self, child: Sequence) -> None:
        """A sample whose fork did not happen (its parent's admission was refused or lost): it
        waits, attached to the parent, to be forked at the parent's next admission."""
        if child.status is SequenceStatus.RUNNING:
            self.running.remove(child)
            child.status = SequenceStatus.WAITING
        child.block_table = []
        child.num_committed_blocks = 0
        child.shares_last_block = False

    def _requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue: it is the next to be admitted."""
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # ---- the memory call -----------------------------------------------------------------
    def _send(self, request: StepRequest, plan: _Plan) -> None:
        request.num_waiting = len(self.waiting)  # the replica's load, for routers asking the memory service
        request.step = self.num_memory_calls + 1  # this replica's step number (from 1), as its block events show it
        request.preempted = self._take_preempted(request.free)
        self.memory.send(request)
        self.num_memory_calls += 1
        self._in_flight = plan

    def _receive(self) -> ScheduledBatch | None:
        """Apply the answer to the request in flight; the batch it lets run (None if none)."""
        plan, self._in_flight = self._in_flight, None
        response = self.memory.receive()
        self._num_free_blocks = response.stats.num_free_blocks
        self.last_stats = response.stats
        by_id = {s.request_id: s for s in (*plan.seqs, *plan.forks)}
        for seq_id, table in response.block_tables.items():
            seq = by_id[seq_id]
            if seq.is_finished:  # ended while its request was in flight: free what it got
                if plan.is_prefill:  # the whole table is news; its cached prefix (or, n > 1, all) is shared
                    shared = (
                        len(table) if seq.params.n > 1 else response.hit_tokens.get(seq_id, 0) // self.config.block_size
                    )
                    self._to_free[seq_id] = max(len(table) - shared, 0)
                else:  # finish() counted the table it knew; the block this answer may add is not counted
                    self._to_free.setdefault(seq_id, 0)
                continue
            seq.block_table = table
            if plan.is_prefill:  # admitted: the prompt's cached prefix is not computed again
                seq.num_hit_tokens = response.hit_tokens.get(seq_id, 0)
                seq.num_cached_tokens = seq.num_hit_tokens
                seq.num_committed_blocks = seq.num_hit_tokens // self.config.block_size
        rejected = set(response.rejected)
        for seq in reversed(plan.seqs):
            if seq.request_id in rejected and seq.status is SequenceStatus.RUNNING:
                # memory disagreed with our count: admit later, or recompute later
                if plan.is_prefill:
                    for child in seq.forks:
                        self._unfork(child)
                    self._requeue(seq)  # nothing was allocated for it
                else:
                    self._preempt(seq)
            elif seq.status is SequenceStatus.RUNNING:
                seq.shares_last_block = False  # its append copied the shared block, if it was one
        for child in plan.forks:
            parent = next(p for p in plan.seqs if child in p.forks)
            if child.status is SequenceStatus.RUNNING:  # forked: it holds what its parent holds
                child.num_hit_tokens, child.num_committed_blocks = parent.num_hit_tokens, parent.num_committed_blocks
                child.block_hashes = list(parent.block_hashes)
                child.shares_last_block = parent.shares_last_block = True
        seqs = [s for s in plan.seqs if s.status is SequenceStatus.RUNNING]
        if plan.is_prefill:
            now = time.perf_counter()
            for seq in (*seqs, *plan.forks):
                seq.first_scheduled_time = seq.first_scheduled_time or now
        return ScheduledBatch(plan.is_prefill, seqs, response.copies) if seqs else None

    def _schedule_without_cache(self) -> ScheduledBatch | None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.perf_counter()
            self.running.append(seq)
        return ScheduledBatch(is_prefill=True, seqs=list(self.running)) if self.running else None
