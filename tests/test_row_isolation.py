"""One request can only fail itself: inside the engine, a row whose logits are not finite, whose
sampling values are extreme, or whose output handling raises ends that request alone; every other
row of the same steps gets exactly the tokens it gets without it, and no block leaks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.local_engine import LocalEngine
from common.sampling_params import GREEDY_TEMPERATURE, MAX_TOP_K, SamplingParams
from compute_service.sampling import sample
from tests.test_continuous_batching import assert_all_blocks_free

INNOCENT_PROMPTS = [f"Innocent stream number {i} says" for i in range(8)]
INNOCENT_PARAMS = [
    SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    if i % 2 == 0
    else SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, seed=i, ignore_eos=True)
    for i in range(8)
]
FAULT_SALT = "inject-a-row-fault"


def new_engine() -> LocalEngine:
    return LocalEngine(model="dummy:tiny", kv_budget_tokens=4096, fault_injection_salt=FAULT_SALT)


@pytest.fixture(scope="module")
def alone():
    """Each innocent request's tokens in a batch of innocents only."""
    return [r.token_ids for r in new_engine().generate(INNOCENT_PROMPTS, INNOCENT_PARAMS)]


def run_with_poison(engine: LocalEngine, poison: SamplingParams, poison_prompt: str = "poison"):
    """The innocents plus one poison request, added in the middle, stepped to the end: the
    innocents' tokens and every output of the poison's samples."""
    ids = [engine.add_request(p, sp) for p, sp in zip(INNOCENT_PROMPTS[:4], INNOCENT_PARAMS[:4], strict=False)]
    poison_id = engine.add_request(poison_prompt, poison)
    ids += [engine.add_request(p, sp) for p, sp in zip(INNOCENT_PROMPTS[4:], INNOCENT_PARAMS[4:], strict=False)]
    tokens = {rid: [] for rid in ids}
    poison_outputs = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.group_id == poison_id:
                poison_outputs.append(out)
            else:
                tokens[out.group_id] += out.new_token_ids
    return [tokens[rid] for rid in ids], poison_outputs


def test_an_injected_row_failure_ends_that_request_alone(alone):
    engine = new_engine()
    innocents, poison = run_with_poison(engine, SamplingParams(max_new_tokens=12, n=3, seed=5, cache_salt=FAULT_SALT))
    assert innocents == alone
    finished = [out for out in poison if out.finished]
    assert sorted(out.index for out in finished) == [0, 1, 2]  # every sample of it ended, once
    assert all(out.finish_reason == "error" and "processing this request's output" in out.error for out in finished)
    assert not any(out.new_token_ids for out in poison)  # it failed on its first token
    assert_all_blocks_free(engine)


def test_non_finite_logits_fail_their_row_alone(alone, monkeypatch):
    """The model emits NaN for one sequence's row only (a fault that can hit one request's data)."""
    engine = new_engine()
    poison_id = "req-4"  # ids are given in order: four innocents are added before it
    batches = []
    prepare, execute = engine.runner.prepare, engine.runner.execute
    monkeypatch.setattr(engine.runner, "prepare", lambda batch: (batches.append(batch), prepare(batch))[1])

    def poisoned(prepared):
        logits = execute(prepared).clone()
        for row, seq in enumerate(batches[-1].seqs):
            if seq.group_id == poison_id and len(seq.output_token_ids) >= 3:  # after a few good tokens
                logits[row] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    innocents, poison = run_with_poison(engine, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert innocents == alone
    assert [len(out.new_token_ids) for out in poison] == [1, 1, 1, 0]  # three tokens, then the failure
    assert poison[-1].finished and poison[-1].finish_reason == "error"
    assert "not finite" in poison[-1].error
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "poison",
    [
        dict(temperature=1e-45),
        dict(temperature=5e-324),
        dict(temperature=GREEDY_TEMPERATURE / 2),
        dict(temperature=3.4e38, top_p=1e-45),
        dict(temperature=1e-30, top_k=1),
        dict(temperature=2e-5, top_p=1e-40),
        dict(temperature=1e-38, top_k=MAX_TOP_K, logprobs=5),
    ],
)
def test_extreme_valid_sampling_values_serve_and_change_no_one_else(alone, poison):
    """Values the validation accepts: they are served (a temperature below GREEDY_TEMPERATURE as
    greedy), never an error, and the innocents' tokens do not move."""
    engine = new_engine()
    params = SamplingParams(max_new_tokens=12, seed=3, ignore_eos=True, **poison)
    params.validate()
    innocents, outputs = run_with_poison(engine, params)
    assert innocents == alone
    assert outputs[-1].finished and outputs[-1].finish_reason == "length", outputs[-1].error
    if params.greedy:
        expected = (
            new_engine()
            .generate(["poison"], [SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)])[0]
            .token_ids
        )
        assert sum((out.new_token_ids for out in outputs), []) == expected
    assert_all_blocks_free(engine)


@settings(max_examples=300, deadline=None)
@given(
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0, width=32, allow_infinity=False, allow_subnormal=True)),
    top_k=st.one_of(st.integers(0, 70000), st.just(MAX_TOP_K)),
    top_p=st.floats(min_value=0, max_value=1, exclude_min=True, width=32, allow_subnormal=True),
    scale=st.sampled_from([1.0, 1e-30, 1e4, 1e30]),
    seed=st.integers(0, 2**63 - 1),
)
def test_any_valid_sampling_values_on_finite_logits_pick_a_token(temperature, top_k, top_p, scale, seed):
    """The sampler never fails a row whose logits are finite, whatever values validation let through."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    params.validate()
    logits = torch.randn(2, 50257, generator=torch.Generator().manual_seed(seed % 1000)) * scale
    tokens, failures = sample(logits, [params, SamplingParams(temperature=0)], [seed, 1], [7, 7])
    assert failures == {}
    assert all(0 <= t < 50257 for t in tokens)
    assert tokens[1] == int(logits[1].argmax())


def test_a_non_finite_row_fails_alone_in_the_sampler():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = float("inf")
    logits[2, 3] = float("nan")
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.5, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_p=0.9),
    ]
    tokens, failures = sample(logits, params, [1, 2, 3, 4], [5, 5, 5, 5])
    assert sorted(failures) == [1, 2] and all("not finite" in why for why in failures.values())
    clean, _ = sample(logits[[0, 3]], [params[0], params[3]], [1, 4], [5, 5])
    assert [tokens[0], tokens[3]] == clean
    assert math.isfinite(float(logits[0].sum()))
