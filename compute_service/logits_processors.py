"""What a request's own sampling fields do to its row of logits before a token is picked:
logit_bias, min_tokens, repetition / frequency / presence penalties.

In vLLM v1's order (its sampler applies the bias and the min-tokens mask, then the penalties),
before temperature, top-k, top-p and the greedy argmax (compute_service.sampling). Each is a
function of the sequence's own tokens so far (prompt and output as the request defines them:
tokens another replica generated before a fault count as output), so a row's result never
depends on which rows share its batch, and a request continued elsewhere picks the same tokens.
The formulas are the published ones, tested against independent implementations
(tests/test_logits_processors.py): HF's RepetitionPenaltyLogitsProcessor and
SequenceBiasLogitsProcessor, OpenAI's presence/frequency formula.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from common.sampling_params import SamplingParams


class TokenHistory(Protocol):
    """What a row's processors read: compute_service.sequence.Sequence is one."""

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def output_token_ids(self) -> list[int]: ...


def needs_processing(params: SamplingParams, history: TokenHistory) -> bool:
    """Whether any processor changes this row (most rows: none, and cost nothing)."""
    return bool(
        params.logit_bias
        or params.presence_penalty
        or params.frequency_penalty
        or params.repetition_penalty != 1.0
        or (params.min_tokens and len(history.output_token_ids) < params.min_tokens)
    )


def process_row(
    row_logits: torch.Tensor, params: SamplingParams, history: TokenHistory, eos_token_id: int | None
) -> torch.Tensor:
    """One row's logits (vocab,) float32 after bias, the min-tokens mask and the penalties; a new
    tensor (the raw row stays for logprobs)."""
    logits = row_logits.clone()
    vocab = logits.numel()
    device = logits.device
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        logits.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=device))
    output = history.output_token_ids
    if len(output) < params.min_tokens:  # neither EOS (unless ignored, as vLLM) nor a stop token may end it yet
        ends = [*params.stop_token_ids, *([eos_token_id] if eos_token_id is not None and not params.ignore_eos else [])]
        if ends:
            logits[ends] = float("-inf")
    if params.repetition_penalty != 1.0:  # HF's: over prompt and output; shrinks a logit's magnitude
        seen = torch.tensor(sorted({*history.prompt_token_ids, *output}), dtype=torch.long, device=device)
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:  # OpenAI's: over the output
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=device), minlength=vocab)[:vocab]
        counts = counts.to(logits.dtype)
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def apply_processors(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory], eos_token_id: int | None
) -> torch.Tensor:
    """The batch's logits (B, vocab) with each row's processors applied: the same tensor when no
    row has any (the common case costs one check a row), else a copy with those rows replaced."""
    rows = [row for row, (p, h) in enumerate(zip(params, histories, strict=True)) if needs_processing(p, h)]
    if not rows:
        return logits
    processed = logits.clone()
    for row in rows:
        processed[row] = process_row(logits[row], params[row], histories[row], eos_token_id)
    return processed
