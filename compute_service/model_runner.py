"""ModelRunner: turns a scheduled batch into tensors, runs one forward, returns next-token logits.

It owns the model and the KV pool (the only tensors in the engine), and builds per step:
`input_ids` and `positions` packed over all rows, `slot_mapping` (block_id * block_size + offset)
for the new tokens, the padded `block_tables` and `context_lens` of the one-token rows (decodes:
the paged decode kernel reads their context), and for the prompt chunks the tokens each has in
the pool already (`prefix_lens`: a cached prefix found at admission, or its earlier chunks) with
its block table, which the chunk attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compute_service.kv_cache import KVCache
from compute_service.model import GPT, AttentionMetadata
from compute_service.scheduled_batch import ScheduledBatch


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # (N,) packed over the batch's rows
    positions: torch.Tensor  # (N,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor | None  # (S,) rows of N whose logits are sampled; None: every row


class ModelRunner:
    def __init__(self, model: GPT, kv_cache: KVCache | None, device: str | torch.device) -> None:
        """`kv_cache` None only for the no-cache baseline (compute_service.baselines)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        """The step's tensors, read from the sequences' block tables before the scheduler
        plans the next step (which may preempt one of them and drop its table)."""
        bs = self.kv_cache.block_size
        num_decodes = batch.num_decodes
        ids, positions, slots = [], [], []  # plain ints, one tensor each: a decode step builds this per token
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens  # what the pool holds already is not computed again
            table = seq.block_table
            ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            slots += (table[p // bs] * bs + p % bs for p in range(start, start + num_new))
        decodes = batch.seqs[:num_decodes]
        chunks = batch.seqs[num_decodes:]
        meta = AttentionMetadata(seq_lens=list(batch.num_new_tokens), num_decodes=num_decodes)
        meta.slot_mapping = torch.tensor(slots, device=self.device)
        if decodes:
            max_blocks = max(len(seq.block_table) for seq in decodes)
            tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in decodes]
            meta.block_tables = torch.tensor(tables, dtype=torch.int32, device=self.device)
            meta.context_lens = torch.tensor(
                [seq.num_computed_tokens + 1 for seq in decodes], dtype=torch.int32, device=self.device
            )
        prefix_lens = [seq.num_computed_tokens for seq in chunks]
        if any(prefix_lens):
            meta.prefix_lens = prefix_lens
            meta.prefix_tables = [
                torch.tensor(seq.block_table, device=self.device) if prefix else None
                for seq, prefix in zip(chunks, prefix_lens, strict=True)
            ]
        logits_indices = None  # a decode step samples every row: the fused decode can run it
        if not batch.is_decode_only:
            last = torch.tensor(batch.num_new_tokens).cumsum(0) - 1  # (B,) each row's last token
            logits_indices = last[torch.tensor(batch.samples, dtype=torch.bool)].to(self.device)
        return PreparedBatch(
            torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), meta, logits_indices
        )

    @torch.inference_mode()
    def execute(self, prepared: PreparedBatch) -> torch.Tensor:
        """Logits (S, vocab) for the next token of every row that samples (none: (0, vocab), after
        the forward has written the chunks' KV)."""
        indices = prepared.logits_indices
        if indices is not None and not len(indices):
            self.model.features(prepared.input_ids, prepared.positions, prepared.meta, self.kv_cache, indices)
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return self.model(prepared.input_ids, prepared.positions, prepared.meta, self.kv_cache, logits_indices=indices)
