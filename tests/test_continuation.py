"""A request continued as prompt + the tokens so far (what the gateway sends another replica after
a fault) ends exactly as the uninterrupted run: the same next tokens for greedy and seeded
sampling (every draw is seeded by seed and position), the same stop-string and EOS endings,
max_new_tokens counted across both, the same text."""

from __future__ import annotations

import numpy as np
import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from tests.conftest import random_prompt


@pytest.fixture(scope="module")
def engine():
    return LocalEngine(model="dummy:tiny", kv_budget_tokens=4096)


def run(engine, prompt, params, before=()):
    """(new tokens, finish reason, final text) of one request, continued after `before`."""
    rid = engine.enqueue_validated(prompt, params, None, list(before))
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                seq = out.sequence
                return seq.output_token_ids[len(before) :], out.finish_reason, seq.output_text


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95, seed=11, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=1.2, seed=5, ignore_eos=True),
    ],
)
def test_continuing_at_any_point_gives_the_uninterrupted_tokens(engine, params):
    prompt = random_prompt(np.random.default_rng(3), 17)
    tokens, reason, text = run(engine, prompt, params)
    assert len(tokens) == 30 and reason == "length"
    for cut in (1, 7, 15, 29):
        rest, rest_reason, rest_text = run(engine, prompt, params, tokens[:cut])
        assert tokens[:cut] + rest == tokens, f"continued after {cut} tokens"
        assert (rest_reason, rest_text) == (reason, text)


def test_a_stop_string_spanning_the_point_of_failure_ends_the_request_at_the_same_place(engine):
    prompt = random_prompt(np.random.default_rng(4), 9)
    sampled = dict(max_new_tokens=40, temperature=1.0, seed=2, ignore_eos=True)
    tokens, _, _ = run(engine, prompt, SamplingParams(**sampled))
    decode = engine.tokenizer.decode
    # The first place where the end of token i-1's text and the start of token i's make a string
    # that the text before token i does not contain: a stop string the fault will cut in two.
    for i in range(2, 40):
        stop = decode([tokens[i - 1]])[-2:] + decode([tokens[i]])[:2]
        if len(stop) >= 3 and stop not in decode(tokens[:i]):
            break
    params = SamplingParams(**sampled, stop=[stop])
    whole, reason, whole_text = run(engine, prompt, params)
    assert reason == "stop" and whole == tokens[: i + 1] and stop not in whole_text
    rest, rest_reason, rest_text = run(engine, prompt, params, tokens[:i])  # the fault falls inside it
    assert tokens[:i] + rest == whole and (rest_reason, rest_text) == (reason, whole_text)


def test_tokens_that_already_end_the_request_end_it_at_once(engine):
    prompt = random_prompt(np.random.default_rng(5), 9)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    tokens, _, text = run(engine, prompt, params)
    rest, reason, rest_text = run(engine, prompt, params, tokens)  # all 6 were streamed already
    assert rest == [] and reason == "length" and rest_text == text
    eos = SamplingParams(max_new_tokens=6, temperature=0)
    rest, reason, _ = run(engine, prompt, eos, tokens[:2] + [engine.tokenizer.eot_token_id])
    assert rest == [] and reason == "eos"
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
