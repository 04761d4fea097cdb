"""Per-request sampling parameters applied to one batch of logits.

Each draw is seeded by the sequence's seed and the position of the token it picks
(common.sampling_params.position_seed), so a sequence's tokens do not depend on which other
sequences share the batch, on preemption, on the order requests arrived in, or on which replica
computed the tokens before this one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from common.sampling_params import SamplingParams, TokenLogprobs, position_seed
from compute_service.logits_processors import TokenHistory, apply_processors
from compute_service.native import load_extension


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


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first of equal values), as torch.argmax: through the C++ kernel on
    float32 CPU logits, where torch's reduction took ~75 us a row of GPT-2's 50257 at decode
    (csrc/row_ops.cpp)."""
    kernels = load_extension() if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
    if kernels is not None:
        return kernels.argmax_rows(logits).tolist()
    return logits.argmax(dim=-1).tolist()


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    positions: list[int],
    histories: Sequence[TokenHistory] | None = None,
    eos_token_id: int | None = None,
    grammar_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[int], dict[int, str]]:
    """One next token per row of logits (B, vocab), each row under its own params; row i's draw
    is seeded by (seeds[i], positions[i]). First `grammar_mask` (structured outputs: the
    disallowed tokens of constrained rows to -inf), then, with `histories` (each row's tokens so
    far), the rows' logit processors (compute_service.logits_processors; `eos_token_id` is what
    min_tokens masks).

    A row that cannot be sampled (the model's logits are not finite, or its own sampling values
    leave no valid distribution) fails alone: it is in the returned {row: reason} and its token
    is meaningless; every other row gets exactly the token it would get in a batch without it."""
    logits = logits.float()
    # A row's max and min are finite exactly when every value is (NaN propagates through both):
    # two vectorized reductions, ~90 us for 32 rows of 50257 (isfinite().all() takes ~1.2 ms).
    # Checked on the model's own logits: a processor's mask is -inf by design.
    finite = (torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))).tolist()
    raw = logits
    if grammar_mask is not None:
        logits = grammar_mask(logits)
    if histories is not None:
        logits = apply_processors(logits, params, histories, eos_token_id)
    tokens = greedy_tokens(logits)  # for every row, overwritten where sampling
    failures: dict[int, str] = {}
    if logits is not raw:  # a mask or a processor ran: a row it left no token fails alone
        for row in (logits.amax(dim=-1) == float("-inf")).nonzero().flatten().tolist():
            if finite[row]:
                failures[row] = (
                    f"no token is allowed at position {positions[row]}: structured_output, min_tokens and "
                    "logit_bias together exclude every token"
                )
    generator = torch.Generator()
    for row, (p, seed, position) in enumerate(zip(params, seeds, positions, strict=False)):
        if not finite[row]:
            failures[row] = f"the model's logits at position {position} are not finite (NaN or inf)"
            continue
        if p.greedy or row in failures:
            continue
        probs = filtered_logits(logits[row], p).softmax(-1)
        total = float(probs.sum())
        if not (math.isfinite(total) and total > 0):
            failures[row] = (
                f"sampling at position {position} with temperature={p.temperature}, top_k={p.top_k}, "
                f"top_p={p.top_p} left no valid distribution (non-finite probabilities)"
            )
            continue
        generator.manual_seed(position_seed(seed, position))
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return tokens, failures


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprobs | None]:
    """Per row of logits (B, vocab): the sampled token's logprob and the top `logprobs` tokens',
    for the rows whose request asked (None elsewhere). Log-softmax of the raw logits: what the
    model says, whatever temperature or filter picked the token. One batched op for all rows."""
    rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return result
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # (R, vocab)
    chosen = (
        logprobs.gather(1, torch.tensor([[tokens[row]] for row in rows], device=logprobs.device)).squeeze(1).tolist()
    )
    k = max(params[row].logprobs for row in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for i, row in enumerate(rows):
        want = params[row].logprobs
        result[row] = TokenLogprobs(chosen[i], list(zip(top_ids[i][:want], top_values[i][:want], strict=False)))
    return result
