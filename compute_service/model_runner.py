"""ModelRunner: turns a scheduled batch into tensors, runs one forward, returns next-token logits.

It owns the model and the KV pool (the only tensors in the engine), and builds per step:
`input_ids` and `positions` packed over all sequences, `slot_mapping` (block_id * block_size +
offset) for the new tokens, and for decode the padded `block_tables` and `context_lens`.
A prefill computes only the tokens past a sequence's cached prefix (`num_computed_tokens`: found
in the prefix cache at admission); those attend to the prefix through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compute_service.kv_cache import KVCache
from compute_service.model import GPT, AttentionMetadata
from compute_service.scheduler import ScheduledBatch


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor  # (N,) packed over the batch's sequences
    positions: torch.Tensor  # (N,)
    meta: AttentionMetadata


class ModelRunner:
    def __init__(self, model: GPT, kv_cache: KVCache | None, device: str | torch.device) -> None:
        """`kv_cache` None only for the no-cache baseline (compute_service.baselines)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        """The step's tensors, read from the sequences' block tables before the scheduler
        plans the next step (which may preempt one of them and drop its table)."""
        if batch.is_prefill:
            input_ids, positions, meta = self._prepare_prefill(batch)
        else:
            input_ids, positions, meta = self._prepare_decode(batch)
        return PreparedBatch(input_ids, positions, meta)

    @torch.inference_mode()
    def execute(self, prepared: PreparedBatch) -> torch.Tensor:
        """Logits (B, vocab) for the next token of every sequence in the batch."""
        meta = prepared.meta
        if not meta.is_prefill:  # one token per sequence: every row's logits
            return self.model(prepared.input_ids, prepared.positions, meta, self.kv_cache)
        last = torch.tensor(meta.seq_lens, device=self.device).cumsum(0) - 1  # (B,)
        return self.model(prepared.input_ids, prepared.positions, meta, self.kv_cache, logits_indices=last)

    def _prepare_prefill(self, batch: ScheduledBatch):
        ids, positions, slots, seq_lens, prefix_lens, tables = [], [], [], [], [], []
        for seq in batch.seqs:
            start = seq.num_computed_tokens  # the cached prefix is not recomputed
            pos = torch.arange(start, seq.num_tokens)
            ids.append(torch.tensor(seq.token_ids[start:]))
            positions.append(pos)
            seq_lens.append(seq.num_tokens - start)
            prefix_lens.append(start)
            table = torch.tensor(seq.block_table)
            bs = self.kv_cache.block_size
            slots.append(table[pos // bs] * bs + pos % bs)
            tables.append(table.to(self.device) if start else None)
        slot_mapping = torch.cat(slots).to(self.device)
        meta = AttentionMetadata(
            is_prefill=True,
            seq_lens=seq_lens,
            slot_mapping=slot_mapping,
            prefix_lens=prefix_lens if any(prefix_lens) else None,
            prefix_tables=tables if any(prefix_lens) else None,
        )
        return torch.cat(ids).to(self.device), torch.cat(positions).to(self.device), meta

    def _prepare_decode(self, batch: ScheduledBatch):
        bs = self.kv_cache.block_size
        seqs = batch.seqs
        positions = [seq.num_tokens - 1 for seq in seqs]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions, strict=False)]
        max_blocks = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs]
        meta = AttentionMetadata(
            is_prefill=False,
            seq_lens=[1] * len(seqs),
            slot_mapping=torch.tensor(slots, device=self.device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=self.device),
        )
        input_ids = torch.tensor([seq.token_ids[-1] for seq in seqs], device=self.device)
        return input_ids, torch.tensor(positions, device=self.device), meta
