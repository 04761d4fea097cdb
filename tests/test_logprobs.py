"""Logprobs against Hugging Face's GPT-2 on the same weights: each sampled token's logprob and
the top-k are the log-softmax of the model's raw logits at its position, and asking for them
changes no token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.local_engine import LocalEngine
from common.sampling_params import FieldError, SamplingParams
from tests.conftest import random_prompt


def _run(engine: LocalEngine, prompts: list[list[int]], params: SamplingParams):
    """Every sample's tokens and logprobs, by (prompt index, sample index)."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict = {}
    logprobs: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            key = (ids.index(out.group_id), out.index)
            tokens.setdefault(key, []).extend(out.new_token_ids)
            logprobs.setdefault(key, []).extend(out.logprobs)
            assert len(out.logprobs) == (len(out.new_token_ids) if params.logprobs is not None else 0)
    return tokens, logprobs


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_hf_log_softmax_in_a_batch_with_n_2(hf_gpt2_dir, hf_model, temperature):
    rng = np.random.default_rng(3)
    prompts = [random_prompt(rng, n) for n in (5, 23, 40)]
    params = SamplingParams(
        max_new_tokens=12, temperature=temperature, top_k=40, seed=11, n=2, ignore_eos=True, logprobs=5
    )
    engine = LocalEngine(model=str(hf_gpt2_dir), block_size=16, kv_budget_tokens=4096)
    tokens, logprobs = _run(engine, prompts, params)
    plain = LocalEngine(model=str(hf_gpt2_dir), block_size=16, kv_budget_tokens=4096)
    plain_tokens, _ = _run(plain, prompts, SamplingParams(**{**params.__dict__, "logprobs": None}))
    assert tokens == plain_tokens  # asking for logprobs changes no token
    for (p, _), out in tokens.items():
        prompt = prompts[p]
        with torch.no_grad():
            expected = torch.log_softmax(hf_model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1], -1)
        for position, (token, got) in enumerate(zip(out, logprobs[(p, _)], strict=False)):
            row = expected[position]
            assert got.logprob == pytest.approx(row[token].item(), abs=1e-4)
            top_values, top_ids = row.topk(5)
            assert [t for t, _ in got.top] == top_ids.tolist()
            assert [v for _, v in got.top] == pytest.approx(top_values.tolist(), abs=1e-4)
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_logprobs_zero_gives_only_the_sampled_tokens_and_out_of_range_is_refused():
    engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=1024)
    tokens, logprobs = _run(engine, [[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0, logprobs=0))
    assert len(logprobs[(0, 0)]) == 4 and all(lp.top == [] and lp.logprob <= 0 for lp in logprobs[(0, 0)])
    for bad in (6, -1):
        with pytest.raises(FieldError) as err:
            SamplingParams(logprobs=bad).validate()
        assert err.value.field == "logprobs"
