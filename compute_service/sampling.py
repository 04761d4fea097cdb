"""Per-request sampling parameters applied to one batch of logits.

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


def filtered_logits(row_logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's logits (vocab,) after temperature, top-k, then top-p (in that order, as HF's
    generate applies them): the tokens filtered out are -inf."""
    row_logits = row_logits / params.temperature
    if 0 < params.top_k < row_logits.numel():
        kth = torch.topk(row_logits, params.top_k).values[-1]
        row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row_logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest set whose mass reaches top_p
        row_logits = row_logits.index_fill(0, order[drop], float("-inf"))
    return row_logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One next token per row of logits (B, vocab), each row under its own params."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row, overwritten where sampling
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            continue
        probs = filtered_logits(logits[row], p).softmax(-1)
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens
