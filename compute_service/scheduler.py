"""Who runs each step: continuous batching with all-or-nothing preemption by recompute.

No tensors here. Each step is either a prefill of newly admitted sequences (prefill first, as
vLLM v0 and nano-vllm do) or one decode token for every running sequence. The scheduler keeps
its own count of free blocks (from the memory side's last answer plus what it frees), decides
admissions and preemptions with it, then makes exactly one batched memory call per step.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from compute_service.sequence import FinishReason, Sequence, SequenceStatus
from memory_service.block_allocator import AllocatorStats
from memory_service.step import Allocation, StepRequest, StepResponse

StepFn = Callable[[StepRequest], StepResponse]


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


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    copies: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, step_fn: StepFn | None) -> None:
        """`step_fn` is the memory call; None means no KV cache (the no-cache mode)."""
        self.config = config
        self.step_fn = step_fn
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self.num_steps = 0  # schedule()/flush_frees() rounds that talked to memory
        self.num_memory_calls = 0
        self.last_stats: AllocatorStats | None = None
        self._num_free_blocks = config.num_blocks
        self._to_free: list[Sequence] = []

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence now; its blocks go back in the next memory call."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.block_table:
            self._to_free.append(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()

    def flush_frees(self) -> None:
        """Hand finished sequences' blocks back now (called when nothing else is left to run)."""
        if self._to_free and self.step_fn is not None:
            self.num_steps += 1
            self._call(StepRequest(free=self._take_frees()[0]))
        self._to_free = []

    def _take_frees(self) -> tuple[list, int]:
        """The ids this round's memory call frees, and how many blocks that returns."""
        ids = [seq.request_id for seq in self._to_free]
        blocks = sum(len(seq.block_table) for seq in self._to_free)
        for seq in self._to_free:
            seq.block_table = []
        self._to_free = []
        return ids, blocks

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free)

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
        if self.step_fn is None:
            return self._schedule_without_cache()
        self.num_steps += 1
        free_ids, freed_blocks = self._take_frees()
        free_blocks = self._num_free_blocks + freed_blocks

        admitted = self._admit(free_blocks)
        if admitted:
            allocs = [Allocation(s.request_id, s.num_tokens, self._reserve(s)) for s in admitted]
            response = self._call(StepRequest(free=free_ids, allocate=allocs))
            rejected = set(response.rejected)
            for seq in reversed(admitted):
                if seq.request_id in rejected:  # memory disagreed with our count: try later
                    self.waiting.appendleft(seq)
            admitted = [s for s in admitted if s.request_id not in rejected]
            for seq in admitted:
                seq.block_table = response.block_tables[seq.request_id]
                seq.status = SequenceStatus.RUNNING
                seq.first_scheduled_time = seq.first_scheduled_time or time.perf_counter()
                self.running.append(seq)
            if admitted:
                return ScheduledBatch(is_prefill=True, seqs=admitted, copies=response.copies)
            free_ids, free_blocks = [], self._num_free_blocks
        return self._schedule_decode(free_ids, free_blocks)

    def _admit(self, free_blocks: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if admitted and num_tokens + seq.num_tokens > self.config.max_num_batched_tokens:
                break
            needed = -(-max(seq.num_tokens, self._reserve(seq)) // self.config.block_size)
            running = len(self.running) + len(admitted) + 1
            headroom = self.config.watermark_blocks + self.config.headroom_blocks_per_seq * running
            if free_blocks - needed < headroom and (self.running or admitted):
                break
            if needed > free_blocks:
                break
            admitted.append(self.waiting.popleft())
            free_blocks -= needed
            num_tokens += seq.num_tokens
        return admitted

    def _schedule_decode(self, free_ids: list, free_blocks: int) -> ScheduledBatch | None:
        block_size = self.config.block_size
        needs = {s.request_id: int(s.num_cached_tokens == len(s.block_table) * block_size) for s in self.running}
        while self.running and sum(needs[s.request_id] for s in self.running) > free_blocks:
            victim = self._preempt_last()
            free_ids.append(victim.request_id)
            free_blocks += len(victim.block_table)
            victim.block_table = []
        if not self.running:
            if free_ids:
                self._call(StepRequest(free=free_ids))
            return None
        response = self._call(StepRequest(free=free_ids, append=[(s.request_id, 1) for s in self.running]))
        for seq_id, table in response.block_tables.items():
            next(s for s in self.running if s.request_id == seq_id).block_table = table
        for seq_id in response.rejected:  # memory disagreed with our count: recompute later
            victim = next(s for s in self.running if s.request_id == seq_id)
            self._preempt(victim)
            self._to_free.append(victim)
        return ScheduledBatch(is_prefill=False, seqs=list(self.running), copies=response.copies)

    def _preempt_last(self) -> Sequence:
        victim = self.running[-1]
        self._preempt(victim)
        return victim

    def _preempt(self, seq: Sequence) -> None:
        """All or nothing: drop every cached token; the sequence is recomputed from the front."""
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _call(self, request: StepRequest) -> StepResponse:
        response = self.step_fn(request)
        self.num_memory_calls += 1
        self._num_free_blocks = response.stats.num_free_blocks
        self.last_stats = response.stats
        return response

    def _schedule_without_cache(self) -> ScheduledBatch | None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.perf_counter()
            self.running.append(seq)
        return ScheduledBatch(is_prefill=True, seqs=list(self.running)) if self.running else None
