"""Who runs each step: continuous batching with all-or-nothing preemption by recompute.

No tensors and no memory messages here: the KVCacheManager (compute_service.kv_manager) owns the
blocks, the free count, the prefix knowledge and the memory call; this decides who runs. Each step
is either a prefill of newly admitted sequences (prefill first, as vLLM v0 and nano-vllm do) or
one decode token for every running sequence. Admissions and preemptions are decided with the
manager's count of free blocks; what the memory side's answer says did not fit is requeued (an
admission) or preempted (an append) here.

The call is pipelined one step ahead (vLLM's async scheduling): `plan_next(batch)` sends the
next step's request while `batch`'s forward runs, assuming every sequence in it gets one more
token; `schedule()` reads the answer. A sequence that ends by EOS or a stop string in between
had one slot asked for it in vain: its blocks go back one call later. One that ends by length is
foreseen and asks for nothing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from compute_service.admission import Admission
from compute_service.kv_manager import KVCacheManager
from compute_service.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    watermark_blocks: int = 1  # kept free at admission so running sequences can grow
    headroom_blocks_per_seq: int = 0  # and this many more per running sequence (fewer recomputes)


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]


@dataclass
class _Plan:
    """The step whose memory call is in flight: what it will run once the answer is in."""

    is_prefill: bool
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self.num_schedule_rounds = 0  # schedule()/flush_frees() rounds that talked to memory
        self._in_flight: _Plan | None = None
        self.admission = Admission(config, kv)

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.kv.track(seq)
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence now; its blocks go back in the next memory call."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.kv.free(seq, self.running)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()

    def flush_frees(self) -> None:
        """Hand finished sequences' blocks back now (called when nothing else is left to run)."""
        if self._in_flight is not None:
            self._receive()  # only finished sequences can be in it now: their blocks join the frees
        if self.kv.flush(self.running, len(self.waiting)):
            self.num_schedule_rounds += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.kv.has_pending())

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """This step's batch: the answer to the call plan_next() sent during the last forward,
        or (nothing in flight, or all of it finished meanwhile) a call made now."""
        self.num_schedule_rounds += 1
        batch = self._receive() if self._in_flight is not None else None
        if batch is None and self._plan(ahead=set()):
            batch = self._receive()
        return batch

    def plan_next(self, batch: ScheduledBatch) -> None:
        """Send the next step's memory call now, as if `batch` had run: it travels while
        `batch`'s forward does. Only called with nothing in flight. Not after a prefill that
        prompts are held back for: planned after it ran, the next step can admit them with the
        prefix it computed (a round trip of under a millisecond next to a prefill's forward)."""
        if batch.is_prefill and self.admission.holding:
            return
        self._plan(ahead={s.request_id for s in batch.seqs})

    def _plan(self, ahead: set) -> bool:
        """Decide the next step and send its call; `ahead` = sequences gaining a token before
        it runs. False when there is nothing to run (queued frees then wait for the next call)."""
        self.kv.commit_computed(self.running)
        free_blocks = self.kv.num_free_blocks
        going_on = [s for s in self.running if not self._ends_by_length(s, ahead)]
        admitted = self.admission.admit(self.waiting, self.running, free_blocks, len(going_on))
        if admitted:
            for seq in admitted:
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            self.kv.allocate_slots(admitted, len(self.waiting))
            self._in_flight = _Plan(True, admitted)
            return True
        needs = {s.request_id: self.kv.blocks_for_next_token(s, ahead) for s in going_on}
        new_blocks = sum(needs.values())
        while going_on and new_blocks > free_blocks:
            victim = going_on.pop()  # the last admitted; if its forward is in flight, that forward
            free_blocks += self.kv.private_blocks(victim, self.running)  # still writes these blocks, which no one reads
            new_blocks -= needs[victim.request_id]
            self._preempt(victim)
        if not going_on:
            return False
        self.kv.append_slots(going_on, len(self.waiting))
        self._in_flight = _Plan(False, going_on)
        return True

    def _ends_by_length(self, seq: Sequence, ahead: set) -> bool:
        return seq.request_id in ahead and len(seq.output_token_ids) + 1 >= seq.params.max_new_tokens

    def forget_memory(self) -> int:
        """The memory side lost this pool (it restarted, or the lease ran out): every block table
        is void, and so is the call in flight. Every running sequence goes back to the front of
        the queue, in admission order, to be recomputed in the new pool, as after a preemption (its
        tokens do not change). Returns how many were running."""
        self._in_flight = None
        running = list(self.running)
        for seq in reversed(running):  # the last admitted first: they end up at the front in order
            self._preempt(seq)
        self.kv.forget()  # the old pool is gone, and its blocks with it: nothing to free
        return len(running)

    def _preempt(self, seq: Sequence) -> None:
        """All or nothing: drop every computed token; the sequence is recomputed from the front
        (with prefix caching, its committed blocks stay cached until evicted: it may hit them)."""
        self.kv.free(seq, self.running, preempted=True)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue: it is the next to be admitted."""
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _receive(self) -> ScheduledBatch | None:
        """Apply the answer to the call in flight; the batch it lets run (None if none)."""
        plan, self._in_flight = self._in_flight, None
        answer = self.kv.receive()
        for seq in reversed(plan.seqs):
            if seq.request_id in answer.rejected and seq.status is SequenceStatus.RUNNING:
                # the memory side disagreed with the count: admit later, or recompute later
                if plan.is_prefill:
                    self._requeue(seq)  # nothing was allocated for it
                else:
                    self._preempt(seq)
        seqs = [s for s in plan.seqs if s.status is SequenceStatus.RUNNING]
        if plan.is_prefill:
            now = time.perf_counter()
            for seq in seqs:
                seq.first_scheduled_time = seq.first_scheduled_time or now
        return ScheduledBatch(plan.is_prefill, seqs) if seqs else None
