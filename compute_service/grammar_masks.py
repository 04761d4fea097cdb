"""Grammar masks on the step's logits: each sampling row whose sequence has a matcher
(common.structured_output) may pick only the tokens its grammar allows next.

The masks depend only on the tokens a matcher has consumed, never on the logits, so they are
filled on a worker thread while the forward runs (llguidance drops the GIL while it computes a
mask, as torch does in its kernels) and applied once the logits exist, before the logit
processors and the sampler. A matcher is touched by one thread at a time: the engine thread
consumes the sampled tokens only after the step's masks are done.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence as Seq

import numpy as np
import torch

_BITS = torch.arange(32, dtype=torch.int32)
log = logging.getLogger("compute_service")


class GrammarMasks:
    def __init__(self, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.words = (vocab_size + 31) // 32
        self._pool: ThreadPoolExecutor | None = None  # made at the first constrained step

    def start(self, matchers: Seq[object | None]) -> tuple[list[int], Future] | None:
        """Begin filling the masks of the rows that have a matcher (None when no row has one)."""
        rows = [(row, m) for row, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return [row for row, _ in rows], self._pool.submit(self._fill, [m for _, m in rows])

    def _eos_only(self, bitmask: np.ndarray, i: int) -> None:
        """Row i may only end: what llguidance itself allows a matcher in an error state."""
        bitmask[i] = 0
        bitmask[i, self.eos_token_id // 32] = np.uint32(1 << (self.eos_token_id % 32)).view(np.int32)

    def _fill(self, matchers: list[object]) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask  # noqa: PLC0415 - loaded with the first grammar

        bitmask = np.full((len(matchers), self.words), -1, dtype=np.int32)
        for i, matcher in enumerate(matchers):
            try:
                fill_next_token_bitmask(matcher, bitmask, i)
            except Exception:  # this row alone
                log.exception("a grammar mask failed; its row may only end")
                self._eos_only(bitmask, i)
        return bitmask

    def apply(self, logits: torch.Tensor, pending: tuple[list[int], Future] | None) -> torch.Tensor:
        """`logits` (B, vocab) with each constrained row's disallowed tokens at -inf (a new tensor
        when any row is constrained; the raw one stays for logprobs)."""
        if pending is None:
            return logits
        rows, future = pending
        try:
            bitmask = future.result()
        except Exception:  # the constrained rows end; the free ones are untouched
            log.exception("grammar masks failed; the constrained rows of this step may only end")
            bitmask = np.zeros((len(rows), self.words), dtype=np.int32)
            for i in range(len(rows)):
                self._eos_only(bitmask, i)
        words = torch.from_numpy(bitmask)
        allowed = ((words.unsqueeze(-1) >> _BITS) & 1).reshape(len(rows), -1)[:, : logits.shape[-1]].bool()
        if allowed.shape[1] < logits.shape[-1]:  # ids past the tokenizer's (a padded vocabulary): never allowed
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[1]), value=False)
        allowed = allowed.to(logits.device, non_blocking=True)
        masked = logits.float().clone()
        masked[rows] = masked[rows].masked_fill(~allowed, float("-inf"))
        return masked
