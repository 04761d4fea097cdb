"""The request-level logit processors against statements nobody here wrote: HF's
RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor and MinNewTokensLengthLogitsProcessor
on the same logits and tokens, and OpenAI's published presence/frequency formula. Then what the
sampler does with them: the processed row picks the token, the raw row is what logprobs report,
and a row without processors is untouched."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from common.sampling_params import SamplingParams
from compute_service.logits_processors import process_row
from compute_service.sampling import sample, token_logprobs

transformers = pytest.importorskip("transformers")

VOCAB, EOS = 50257, 50256


@dataclass
class History:
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def case(seed: int) -> tuple[torch.Tensor, History]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g) * 4
    prompt = torch.randint(0, VOCAB, (30,), generator=g).tolist()
    output = torch.randint(0, 200, (25,), generator=g).tolist()  # repeats: counts > 1
    return logits, History(prompt, output)


def hf(processor, logits: torch.Tensor, history: History) -> torch.Tensor:
    ids = torch.tensor([history.prompt_token_ids + history.output_token_ids])
    return processor(ids, logits[None].clone())[0]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty_equals_hf(penalty, seed):
    logits, history = case(seed)
    ours = process_row(logits, SamplingParams(repetition_penalty=penalty), history, EOS)
    theirs = hf(transformers.RepetitionPenaltyLogitsProcessor(penalty), logits, history)
    assert not torch.equal(ours, logits)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_logit_bias_equals_hf_sequence_bias(seed):
    logits, history = case(seed)
    bias = {5: 100.0, 17: -100.0, 300: 2.5, EOS: -7.25, 49000: 0.125}
    ours = process_row(logits, SamplingParams(logit_bias=bias), history, EOS)
    theirs = hf(transformers.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()]), logits, history)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 1.5), (-1.0, 0.75), (2.0, -2.0)])
def test_presence_and_frequency_equal_openais_formula(presence, frequency):
    """OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c[j] = how
    often j was sampled before (the output only: prompt tokens do not count)."""
    logits, history = case(2)
    ours = process_row(logits, SamplingParams(presence_penalty=presence, frequency_penalty=frequency), history, EOS)
    counts = Counter(history.output_token_ids)
    expected = [
        float(mu) - counts[j] * frequency - (1.0 if counts[j] > 0 else 0.0) * presence
        for j, mu in enumerate(logits.tolist())
    ]
    torch.testing.assert_close(ours, torch.tensor(expected), atol=1e-5, rtol=0)
    assert torch.equal(
        ours[[t for t in history.prompt_token_ids if t not in counts]],
        logits[[t for t in history.prompt_token_ids if t not in counts]],
    )


@pytest.mark.parametrize("num_output", [0, 3, 5, 9])
def test_min_tokens_masks_eos_and_stop_tokens_as_hf_until_reached(num_output):
    logits, history = case(3)
    history.output_token_ids = history.output_token_ids[:num_output]
    params = SamplingParams(min_tokens=5, stop_token_ids=[11, 198])
    ours = process_row(logits, params, history, EOS)
    processor = transformers.MinNewTokensLengthLogitsProcessor(len(history.prompt_token_ids), 5, [EOS, 11, 198])
    torch.testing.assert_close(ours, hf(processor, logits, history))
    masked = num_output < 5
    assert torch.isinf(ours[[EOS, 11, 198]]).all() == masked


def test_the_sampler_picks_from_processed_rows_and_reports_raw_logprobs():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4))
    histories = [History([1, 2, 3], [7, 7]), History([4], []), History([5], [9])]
    forced = int(logits[0].argmin())
    params = [
        SamplingParams(temperature=0, logit_bias={forced: 100.0}, logprobs=1),  # greedy, biased to the least likely
        SamplingParams(temperature=0.9, seed=3, min_tokens=2),  # EOS masked: -inf in the row, not a failed row
        SamplingParams(temperature=0, logprobs=1),  # no processor: untouched
    ]
    tokens, failures = sample(logits, params, [1, 2, 3], [5, 1, 2], histories, EOS)
    assert not failures and tokens[0] == forced and tokens[2] == int(logits[2].argmax())
    plain, _ = sample(logits[1:2], [SamplingParams(temperature=0.9, seed=3)], [2], [1])
    assert tokens[1] == plain[0] or plain[0] == EOS  # the mask moves the draw only if it drew EOS
    reported = token_logprobs(logits, params, tokens)
    assert reported[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[forced]), abs=1e-5)
