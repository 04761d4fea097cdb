"""The engine against Hugging Face transformers' GPT-2 on the same weights (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from tests.conftest import hf_greedy, random_prompt

GREEDY = dict(temperature=0.0, ignore_eos=True)


def capture_logits(engine: LocalEngine) -> list[torch.Tensor]:
    """Record the logits every step computes (the runner's output, before sampling)."""
    seen: list[torch.Tensor] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda prepared: seen.append(execute(prepared)) or seen[-1]
    return seen


@pytest.mark.parametrize("mode", ["paged", "contiguous", "no-cache"])
def test_logits_match_hf_at_prefill_and_every_decode_step(hf_gpt2_dir, hf_model, mode):
    engine = LocalEngine(model=str(hf_gpt2_dir), mode=mode, block_size=16, kv_budget_tokens=4096)
    logits = capture_logits(engine)
    prompt = random_prompt(np.random.default_rng(0), 37)
    result = engine.generate([prompt], SamplingParams(max_new_tokens=20, **GREEDY))[0]
    full = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        expected = hf_model(full).logits[0, len(prompt) - 1 : -1]  # (20, vocab)
    got = torch.cat(logits)  # one row per step
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("prompt_len", [1, 15, 16, 17, 100, 300])
def test_greedy_tokens_equal_hf_generate(hf_gpt2_dir, hf_model, block_size, prompt_len):
    engine = LocalEngine(model=str(hf_gpt2_dir), block_size=block_size, kv_budget_tokens=2048)
    prompt = random_prompt(np.random.default_rng(prompt_len), prompt_len)
    result = engine.generate([prompt], SamplingParams(max_new_tokens=24, **GREEDY))[0]
    assert result.token_ids == hf_greedy(hf_model, prompt, 24)
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_three_modes_give_identical_greedy_tokens(hf_gpt2_dir):
    prompt = random_prompt(np.random.default_rng(7), 50)
    outputs = []
    for mode in ("paged", "contiguous", "no-cache"):
        engine = LocalEngine(model=str(hf_gpt2_dir), mode=mode, kv_budget_tokens=2048)
        outputs.append(engine.generate([prompt], SamplingParams(max_new_tokens=40, **GREEDY))[0].token_ids)
    assert outputs[0] == outputs[1] == outputs[2]


def test_fixed_seed_gives_identical_sampled_tokens_and_other_seed_differs():
    def run(seed):
        engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=1024)
        params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=seed, ignore_eos=True)
        return engine.generate(["Once upon a time"], params)[0].token_ids

    assert run(5) == run(5)
    assert run(5) != run(6)
