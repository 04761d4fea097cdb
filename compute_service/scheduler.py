"""Who runs each step: continuous batching with chunked prefill, preemption by recompute.

No tensors and no memory messages here: the KVCacheManager (compute_service.kv_manager) owns the
blocks, the free count, the prefix knowledge and the memory call; this decides who runs.

One rule per step, as vLLM v1's: a token budget (`max_num_batched_tokens`) is filled first with
every running sequence's next row (a decode's one token, then the next chunk of a prompt being
computed), in admission order, then with newly admitted prompts (the step's first admission is
cut to what is left; a later one waits for a step it fits: compute_service.admission). A prompt
longer than that runs in chunks over several steps, each chunk attending to the earlier ones in
the pool; a sequence has one `num_computed_tokens` that chunks and decodes both advance, and samples a token
only in the step whose row reaches its last token. With `chunked_prefill` off a prompt runs whole
(the budget is raised so that any prompt fits beside every decode). Admissions and preemptions
are decided with the manager's count of free blocks; what the memory side's answer says did not
fit is requeued (an admission) or preempted (a growth) here.

The call is pipelined one step ahead (vLLM's async scheduling): `plan_next(batch)` sends the
next step's request while `batch`'s forward runs, projecting each sequence's state as if that
forward had run (its chunk computed, a token appended where its row samples); `schedule()` reads
the answer. A sequence that ends by EOS or a stop string in between had a slot asked for it in
vain: its blocks go back one call later. One that ends by length is foreseen and asks for nothing.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from compute_service.admission import Admission
from compute_service.kv_manager import KVCacheManager
from compute_service.scheduled_batch import ScheduledBatch
from compute_service.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096  # the step's token budget: decodes' tokens plus prompt chunks'
    chunked_prefill: bool = True  # False: a prompt is computed in one step, whole
    # A prompt's chunk in one step, at most (vLLM's long_prefill_token_threshold): bounds the
    # stall one long prompt causes while the budget still lets many short ones in at once.
    long_prefill_token_threshold: int = 0  # 0 = the budget
    watermark_blocks: int = 1  # kept free at admission so running sequences can grow
    headroom_blocks_per_seq: int = 0  # and this many more per running sequence (fewer recomputes)

    @property
    def chunk_cap(self) -> int:
        """Tokens one prompt computes in one step, at most."""
        if not self.chunked_prefill:
            return self.max_num_batched_tokens
        return self.long_prefill_token_threshold or self.max_num_batched_tokens


@dataclass
class _Plan:
    """The step whose memory call is in flight: its rows' sequences and the most tokens each may
    compute (an admission's first chunk is cut to it once the answer says what was cached)."""

    seqs: list[Sequence]
    budgets: dict[str, int]
    admitted: set[str]


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
        if batch is None and self._plan(ahead={}):
            batch = self._receive()
        return batch

    def plan_next(self, batch: ScheduledBatch) -> None:
        """Send the next step's memory call now, as if `batch` had run: it travels while
        `batch`'s forward does. Only called with nothing in flight. Not after a step computing
        prompt tokens that prompts are held back for: planned after it ran, the next step can
        admit them with the prefix it computed (a round trip of under a millisecond next to the
        forward of a chunk)."""
        if not batch.is_decode_only and self.admission.holding:
            return
        self._plan(ahead=batch.rows())

    def _plan(self, ahead: dict[str, int]) -> bool:
        """Decide the next step and send its call; `ahead` = tokens each sequence computes in the
        step whose forward runs before it. False when there is nothing to run (queued frees then
        wait for the next call)."""
        self.kv.commit_computed(self.running)
        free_blocks = self.kv.num_free_blocks
        budget = self.config.max_num_batched_tokens
        going_on = [s for s in self.running if not self._ends_by_length(s, ahead)]
        rows: dict[Sequence, tuple[int, int]] = {}  # seq -> (first token, tokens) of its next row
        projected = {seq: (self._projected_computed(seq, ahead), self._remaining(seq, ahead)) for seq in going_on}
        for seq in sorted(going_on, key=lambda s: projected[s][1] > 1):  # decodes first
            start, remaining = projected[seq]
            num_new = min(remaining, budget, self.config.chunk_cap)
            if num_new <= 0 or (num_new < remaining and not self.config.chunked_prefill):
                continue  # waits for a step with room
            rows[seq] = (start, num_new)
            budget -= num_new
        needs = {seq: self.kv.blocks_to_grow(seq, start + n) for seq, (start, n) in rows.items()}
        new_blocks = sum(needs.values())
        while going_on and new_blocks > free_blocks:
            victim = going_on.pop()  # the last admitted; if its forward is in flight, that forward
            free_blocks += self.kv.private_blocks(victim, self.running)  # still writes these blocks, which no one reads
            new_blocks -= needs.pop(victim, 0)
            rows.pop(victim, None)
            self._preempt(victim)
        admitted = self.admission.admit(self.waiting, self.running, free_blocks - new_blocks, len(going_on), budget)
        budgets = {seq.request_id: n for seq, (_, n) in rows.items()}
        for seq, first_chunk in admitted.items():
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            # unchunked, the prompt runs whole whatever the answer says was cached
            budgets[seq.request_id] = first_chunk if self.config.chunked_prefill else seq.num_tokens
        if not rows and not admitted:
            return False
        self.kv.send_step(list(admitted), {seq: start + n for seq, (start, n) in rows.items()}, len(self.waiting))
        self._in_flight = _Plan([*rows, *admitted], budgets, {s.request_id for s in admitted})
        return True

    @staticmethod
    def _projected_computed(seq: Sequence, ahead: dict[str, int]) -> int:
        """The sequence's computed tokens once the forward in flight has run."""
        return seq.num_computed_tokens + ahead.get(seq.request_id, 0)

    @classmethod
    def _remaining(cls, seq: Sequence, ahead: dict[str, int]) -> int:
        """Tokens it has to compute after the forward in flight (1 for a decode; a row that
        reaches the last token appends one)."""
        computed = cls._projected_computed(seq, ahead)
        return seq.num_tokens + (seq.request_id in ahead and computed == seq.num_tokens) - computed

    @classmethod
    def _ends_by_length(cls, seq: Sequence, ahead: dict[str, int]) -> bool:
        """The forward in flight samples its last token (max_new_tokens): nothing to plan for it."""
        samples = seq.request_id in ahead and cls._projected_computed(seq, ahead) == seq.num_tokens
        return samples and len(seq.output_token_ids) + 1 >= seq.params.max_new_tokens

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
        self.kv.drop(seq)  # an admission the memory side refused holds nothing
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _receive(self) -> ScheduledBatch | None:
        """Apply the answer to the call in flight; the batch it lets run (None if none)."""
        plan, self._in_flight = self._in_flight, None
        answer = self.kv.receive()
        for seq in reversed(plan.seqs):
            if seq.request_id in answer.rejected and seq.status is SequenceStatus.RUNNING:
                # the memory side disagreed with the count: admit later, or recompute later
                if seq.request_id in plan.admitted:
                    self._requeue(seq)  # nothing was allocated for it
                else:
                    self._preempt(seq)
        now = time.perf_counter()
        rows = []
        for seq in plan.seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished or preempted meanwhile
            if seq.request_id in plan.admitted:
                seq.first_scheduled_time = seq.first_scheduled_time or now
            num_new = min(seq.num_tokens - seq.num_computed_tokens, plan.budgets[seq.request_id])
            if num_new > 0:
                rows.append((seq, num_new))
        return ScheduledBatch.of(rows) if rows else None
