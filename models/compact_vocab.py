"""Train over the token ids the data uses, export a full-vocabulary GPT with the same loss.

Why: at width 256 the softmax over GPT-2's 50,257 ids is ~70% of a training step's FLOPs, yet
Shakespeare's training text uses ~19k of them. The compact model has one embedding row per used id
plus one shared `other` row standing for every unused id. The full-vocabulary softmax of the
exported model (every unused row = the `other` row) has the denominator

    sum_{used i} exp(l_i) + n_other * exp(l_other)

so the compact model adds log(n_other) to the `other` logit while training. Training and the
exported checkpoint then compute exactly the same probabilities, for every id, with no change to
the serving model (weights stay tied, no extra bias).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from compute_service.model import GPT, GPTConfig


class CompactVocab:
    """The map between full GPT-2 ids and the compact training ids (`other` is the last one)."""

    def __init__(self, used_ids: np.ndarray, full_vocab_size: int) -> None:
        self.used_ids = np.unique(used_ids).astype(np.int64)  # compact id i <-> full id used_ids[i]
        self.full_vocab_size = full_vocab_size
        self.num_other = full_vocab_size - len(self.used_ids)
        self.other_id = len(self.used_ids)  # the shared row; absent when every id is used
        self._to_compact = np.full(full_vocab_size, self.other_id, dtype=np.int64)
        self._to_compact[self.used_ids] = np.arange(len(self.used_ids))

    @property
    def size(self) -> int:
        return len(self.used_ids) + (1 if self.num_other else 0)

    def to_compact(self, full_ids: np.ndarray) -> np.ndarray:
        return self._to_compact[np.asarray(full_ids, dtype=np.int64)]

    def logit_offset(self) -> torch.Tensor | None:
        """(size,) zeros but log(n_other) for `other`: makes the compact softmax the full one."""
        if not self.num_other:
            return None  # the full vocabulary: nothing to correct
        offset = torch.zeros(self.size)
        offset[self.other_id] = math.log(self.num_other)
        return offset

    def expand(self, compact: GPT) -> GPT:
        """The full-vocabulary GPT whose every unused id carries the `other` embedding (the model
        itself when every id is used: it is already the full one)."""
        if not self.num_other:
            return compact
        config = GPTConfig(**{**compact.config.__dict__, "vocab_size": self.full_vocab_size})
        full = GPT(config)
        state = {k: v for k, v in compact.state_dict().items() if not k.endswith(("wte.weight", "lm_head.weight"))}
        wte = compact.transformer.wte.weight.detach()  # (size, C)
        full_wte = wte[self.other_id].expand(self.full_vocab_size, -1).clone()  # (V, C)
        full_wte[torch.from_numpy(self.used_ids)] = wte[: self.other_id]
        state["transformer.wte.weight"] = full_wte
        full.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte
        return full.to(wte.device)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Per-token loss (nats) under the full vocabulary: logits (N, V'), targets (N,) -> (N,).

    With an offset (compact training), a target that is `other` stands for one particular unused
    id, whose probability is 1/n_other of the bucket's: adding offset[target] accounts for that."""
    logits = logits.float()
    if offset is None:
        return F.cross_entropy(logits, targets, reduction="none")
    return F.cross_entropy(logits + offset, targets, reduction="none") + offset[targets]
