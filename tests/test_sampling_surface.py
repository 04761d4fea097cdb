"""The rest of the sampling surface in the engine: stop_token_ids and min_tokens end (or do not
end) a sample as vLLM's do, and the penalties stay token-exact when a request continues on
another replica from its tokens so far (they count output tokens, which a continuation carries
apart from the prompt)."""

from __future__ import annotations

import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import FieldError, SamplingParams, validate_request
from compute_service.outputs import GenerationResult

PROMPT = "ROMEO:\nBut soft, what light through yonder window"
EOS = 50256


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine(model="dummy:tiny", block_size=16, kv_budget_tokens=2048)


def run(engine: LocalEngine, params: SamplingParams, outputs: list[int] = ()) -> GenerationResult:
    """One request to the end; with `outputs`, continued from those tokens (as after a fault)."""
    prompt = engine.encode_prompt(PROMPT)
    engine.validate_request(prompt, params)
    request_id = engine.enqueue_validated(prompt, params, output_token_ids=list(outputs))
    finished = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.group_id == request_id:
                finished = out.sequence
    return GenerationResult(
        request_id, finished.prompt_token_ids, finished.output_token_ids, finished.output_text,
        finished.finish_reason.value, 0, 0, 0, 0,
    )  # fmt: skip


def test_a_stop_token_id_ends_the_sample_and_is_left_out_of_the_text(engine):
    plain = run(engine, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
    stop = plain.token_ids[5]
    first = plain.token_ids.index(stop)
    got = run(engine, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop]))
    assert got.token_ids == plain.token_ids[: first + 1] and got.finish_reason == "stop"
    assert got.text == engine.tokenizer.decode(plain.token_ids[:first])


def test_min_tokens_holds_back_eos_and_stop_strings(engine):
    eager = SamplingParams(max_new_tokens=16, temperature=0, logit_bias={EOS: 100.0})
    assert run(engine, eager).token_ids == [EOS]  # the bias makes EOS the argmax at once
    held = run(engine, SamplingParams(max_new_tokens=16, temperature=0, logit_bias={EOS: 100.0}, min_tokens=4))
    assert len(held.token_ids) == 5 and held.token_ids[-1] == EOS and EOS not in held.token_ids[:4]
    assert held.finish_reason == "eos"
    plain = run(engine, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
    stop = engine.tokenizer.decode(plain.token_ids[1:2])  # a string the greedy text has early
    cut = run(engine, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))
    assert len(cut.token_ids) <= 2 and cut.finish_reason == "stop"
    late = run(engine, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop], min_tokens=8))
    # Only an occurrence ending past the first 8 tokens' text counts (vLLM's rule): the expected cut.
    text, floor = plain.text, len(engine.tokenizer.decode(plain.token_ids[:8]))
    at = text.find(stop, max(floor - len(stop) + 1, 0))
    assert late.token_ids == plain.token_ids[: len(late.token_ids)] and len(late.token_ids) >= 8
    if at >= 0:
        assert late.finish_reason == "stop" and late.text == text[:at]
    else:
        assert late.finish_reason == "length" and late.text == text


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_penalties_and_bias_continue_token_exact_from_the_tokens_so_far(engine, temperature):
    params = SamplingParams(
        max_new_tokens=20,
        temperature=temperature,
        seed=7,
        ignore_eos=True,
        presence_penalty=0.8,
        frequency_penalty=1.2,
        repetition_penalty=1.4,
        logit_bias={11: 9.0, 13: 8.0},  # dummy weights: nearly flat logits, so a bias must be large to be drawn
    )
    whole = run(engine, params)
    plain = run(engine, SamplingParams(max_new_tokens=20, temperature=temperature, seed=7, ignore_eos=True))
    assert whole.token_ids != plain.token_ids  # the processors changed what was picked
    for cut in (1, 6, 13):
        continued = run(engine, params, whole.token_ids[:cut])
        assert continued.token_ids == whole.token_ids


@pytest.mark.parametrize(
    "values,field",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=2.5), "repetition_penalty"),
        (dict(logit_bias={1: 100.5}), "logit_bias"),
        (dict(logit_bias={50257: 1.0}), "logit_bias"),
        (dict(logit_bias={i: 1.0 for i in range(301)}), "logit_bias"),
        (dict(min_tokens=17), "min_tokens"),
        (dict(stop_token_ids=[50257]), "stop_token_ids"),
        (dict(stop_token_ids=list(range(17))), "stop_token_ids"),
        (dict(stop_token_ids=[True]), "stop_token_ids"),
    ],
)
def test_each_bound_is_refused_naming_its_field(values, field):
    with pytest.raises(FieldError) as info:
        validate_request([1, 2, 3], SamplingParams(max_new_tokens=16, **values), 1024, 50257)
    assert info.value.field == field and field in str(info.value)
