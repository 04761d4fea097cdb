"""The no-KV-cache baseline: every step recomputes every running sequence from its first token.

Kept for the original design's three-arm benchmark (paged vs contiguous vs no cache, docs/benchmarks.md,
"Single stream"); the serving path never takes it. (Contiguous reservation is the other
baseline: a compute_service.kv_manager.Reservation handed to the paged path.)
"""

from __future__ import annotations

import time

import torch

from compute_service.model import GPT, AttentionMetadata
from compute_service.model_runner import ModelRunner, PreparedBatch
from compute_service.scheduled_batch import ScheduledBatch
from compute_service.scheduler import Scheduler, SchedulerConfig
from compute_service.sequence import Sequence, SequenceStatus


class RecomputeScheduler(Scheduler):
    """Admits up to max_num_seqs and runs all of them in every step, each from its first token.
    No blocks, no memory calls; preemption never happens."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config, kv=None)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.perf_counter()
            self.running.append(seq)
        seqs = list(self.running)  # every token of each, every step; each samples one
        return ScheduledBatch(seqs, [s.num_tokens for s in seqs], [True] * len(seqs)) if seqs else None

    def plan_next(self, batch: ScheduledBatch) -> None:
        pass  # nothing to ask for ahead

    def flush_frees(self) -> None:
        pass  # no blocks

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


class RecomputeRunner(ModelRunner):
    """A forward over every token of every sequence, with no pool to read or write."""

    def __init__(self, model: GPT, device: str | torch.device) -> None:
        super().__init__(model, None, device)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        seqs = batch.seqs
        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], device=self.device)
        positions = torch.cat([torch.arange(s.num_tokens) for s in seqs]).to(self.device)
        seq_lens = [s.num_tokens for s in seqs]
        last = (torch.tensor(seq_lens).cumsum(0) - 1).to(self.device)  # (B,) each sequence's last token
        return PreparedBatch(input_ids, positions, AttentionMetadata(seq_lens=seq_lens), last)
