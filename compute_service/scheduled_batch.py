"""One step's rows, as the scheduler hands them to the runner: which sequences, how many of
their tokens each computes, and which of them sample (compute_service.scheduler decides them;
compute_service.model_runner turns them into tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from compute_service.sequence import Sequence


@dataclass
class ScheduledBatch:
    """One step's rows: a sequence and how many of its tokens the forward computes (from its
    num_computed_tokens on), rows of one token (decodes) first, then prompt chunks. A row samples
    a token when it reaches the sequence's last token; a chunk in the middle of a prompt does not."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    samples: list[bool]  # per row: whether it reaches its sequence's last token (and gets a token)

    @classmethod
    def of(cls, rows: list[tuple[Sequence, int]]) -> ScheduledBatch:
        """Rows in the order the runner packs them, and which of them sample (from the sequences'
        state now: build it just before the forward's tensors are prepared)."""
        rows = sorted(rows, key=lambda row: row[1] > 1)  # stable: one-token rows first, in order
        return cls(
            [seq for seq, _ in rows],
            [n for _, n in rows],
            [seq.num_computed_tokens + n == seq.num_tokens for seq, n in rows],
        )

    @property
    def num_decodes(self) -> int:
        """Leading rows of one token: they attend through the paged decode kernel."""
        return next((i for i, n in enumerate(self.num_new_tokens) if n > 1), len(self.num_new_tokens))

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that get a token from this step, in row order (the logits' rows)."""
        return [seq for seq, sample in zip(self.seqs, self.samples, strict=True) if sample]

    @property
    def is_decode_only(self) -> bool:
        """Every row is one token that samples: the fused decode step can run it."""
        return all(self.samples) and self.num_decodes == len(self.seqs)

    def rows(self) -> dict[str, int]:
        """Tokens each sequence computes in this step, by id."""
        return {seq.request_id: n for seq, n in zip(self.seqs, self.num_new_tokens, strict=True)}
