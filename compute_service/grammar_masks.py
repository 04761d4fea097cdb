"""Grammar masks on the step's logits: each sampling row whose sequence has a matcher
(common.structured_output) may pick only the tokens its grammar allows next.

The masks depend only on the tokens a matcher has consumed, never on the logits, so they are
filled on a worker thread while the forward runs (llguidance drops the GIL while it computes a
mask, as torch does in its kernels) and applied once the logits exist, before the logit
processors and the sampler. A matcher is touched by one thread at a time: the engine thread
consumes the sampled tokens only after the step's masks are done.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence as Seq

import numpy as np
import torch

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarMasks:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._pool: ThreadPoolExecutor | None = None  # made at the first constrained step

    def start(self, matchers: Seq[object | None]) -> Future | None:
        """Begin filling the masks of the rows that have a matcher (None when no row has one)."""
        rows = [(row, m) for row, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._pool.submit(self._fill, rows)

    def _fill(self, rows: list[tuple[int, object]]) -> tuple[list[int], np.ndarray]:
        from llguidance.numpy import fill_next_token_bitmask  # noqa: PLC0415 - loaded with the first grammar

        bitmask = np.full((len(rows), self.words), -1, dtype=np.int32)
        for i, (_, matcher) in enumerate(rows):
            fill_next_token_bitmask(matcher, bitmask, i)
        return [row for row, _ in rows], bitmask

    def apply(self, logits: torch.Tensor, pending: Future | None) -> torch.Tensor:
        """`logits` (B, vocab) with each constrained row's disallowed tokens at -inf (a new tensor
        when any row is constrained; the raw one stays for logprobs)."""
        if pending is None:
            return logits
        rows, bitmask = pending.result()
        words = torch.from_numpy(bitmask)
        allowed = ((words.unsqueeze(-1) >> _BITS) & 1).reshape(len(rows), -1)[:, : logits.shape[-1]].bool()
        if allowed.shape[1] < logits.shape[-1]:  # ids past the tokenizer's (a padded vocabulary): never allowed
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[1]), value=False)
        masked = logits.float().clone()
        masked[rows] = masked[rows].masked_fill(~allowed, float("-inf"))
        return masked
