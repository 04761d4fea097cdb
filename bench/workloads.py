"""Seeded synthetic workloads shared by the benchmarks and the load tests.

`sharegpt-synth`: ShareGPT-like lengths as the PagedAttention paper reports them (its Figure 11:
input mean about 161, output mean about 338 tokens, long-tailed). Prompt and output lengths are
lognormal with sigma 0.8 (a long tail), each at least 4 tokens, prompt + output <= 1024 (GPT-2's
context). The lognormal means (163, 376) are calibrated so that the means *after* that clipping
are 161 and 338 over a large sample (20,000 requests: 161.6 and 338.7). Fixed once chosen: the
numbers in the README are measured on exactly this distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOGNORMAL_INPUT_MEAN, LOGNORMAL_OUTPUT_MEAN, SIGMA = 163, 376, 0.8
MAX_TOTAL_LEN, MIN_LEN = 1024, 4


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


def sharegpt_synth(num_requests: int, seed: int = 0, vocab_size: int = 50257) -> list[Request]:
    rng = np.random.default_rng(seed)
    mu_shift = -SIGMA**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    requests = []
    for _ in range(num_requests):
        prompt_len = int(rng.lognormal(math.log(LOGNORMAL_INPUT_MEAN) + mu_shift, SIGMA))
        output_len = int(rng.lognormal(math.log(LOGNORMAL_OUTPUT_MEAN) + mu_shift, SIGMA))
        prompt_len = min(max(prompt_len, MIN_LEN), MAX_TOTAL_LEN - MIN_LEN)
        output_len = min(max(output_len, MIN_LEN), MAX_TOTAL_LEN - prompt_len)
        # Token ids avoid 50256 so no prompt contains the end-of-text marker.
        prompt = rng.integers(0, vocab_size - 1, size=prompt_len).tolist()
        requests.append(Request(prompt, output_len))
    return requests


def fixed_length(num_requests: int, prompt_tokens: int, new_tokens: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, 50256, size=prompt_tokens).tolist(), new_tokens) for _ in range(num_requests)]


WORKLOADS = {"sharegpt-synth": sharegpt_synth}


def describe(requests: list[Request]) -> str:
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return (f"{len(requests)} requests: prompt mean {np.mean(prompts):.1f} (max {max(prompts)}), "
            f"output mean {np.mean(outputs):.1f} (max {max(outputs)})")
