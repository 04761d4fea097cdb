"""Per-request sampling parameters and the sampler that applies them to one batch of logits.

Each sequence samples with its own seeded torch.Generator, so its tokens do not depend on which
other sequences share the batch, on preemption, or on the order requests arrived in.
"""
from __future__ import annotations

import torch

from common.sampling_params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator:
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One next token per row of logits (B, vocab), each row under its own params."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row, overwritten where sampling
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            continue
        row_logits = logits[row] / p.temperature  # (vocab,)
        if p.top_k > 0 and p.top_k < row_logits.numel():
            kth = torch.topk(row_logits, p.top_k).values[-1]
            row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row_logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set >= top_p
            row_logits = row_logits.index_fill(0, order[drop], float("-inf"))
        probs = row_logits.softmax(-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens
