"""The sampler's temperature / top-k / top-p filtering equals Hugging Face's logits processors
(an implementation nobody here wrote) on the same logits."""

from __future__ import annotations

import pytest
import torch

from common.sampling_params import SamplingParams
from compute_service.sampling import filtered_logits

transformers = pytest.importorskip("transformers")


def hf_filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF generate's warpers, in its order: temperature, top-k, top-p."""
    warpers = [transformers.TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(transformers.TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(transformers.TopPLogitsWarper(p.top_p))
    scores = logits[None].clone()
    for warp in warpers:
        scores = warp(torch.zeros(1, 1, dtype=torch.long), scores)
    return scores[0]


CASES = [
    dict(temperature=1.0, top_k=40),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.8, top_p=0.5),
    dict(temperature=1.3, top_k=100, top_p=0.95),
    dict(temperature=0.9, top_k=3, top_p=0.3),
    dict(temperature=1.0, top_p=0.999),
    dict(temperature=2.0, top_k=1),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filtered_distribution_equals_hf_logits_processors(case, seed):
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(seed)) * 3
    params = SamplingParams(**case)
    ours, theirs = filtered_logits(logits, params), hf_filtered(logits, params)
    kept, hf_kept = torch.isfinite(ours), torch.isfinite(theirs)
    assert 0 < int(kept.sum()) < logits.numel()  # the filter did something
    # Top-p's boundary is a float32 cumulative sum, summed in opposite orders here and in HF: with
    # top_p near 1 a few tail tokens (each ~1e-7 of the mass) may land on either side. Whatever
    # differs must be that tail, never mass that matters.
    tempered = (logits.double() / params.temperature).softmax(-1)
    assert float(tempered[kept ^ hf_kept].sum()) < 1e-4, f"kept {int(kept.sum())} vs HF {int(hf_kept.sum())}"
    if params.top_p == 1.0 or params.top_p <= 0.95:
        assert torch.equal(kept, hf_kept)
    assert torch.allclose(ours.softmax(-1), theirs.softmax(-1), atol=1e-4)
