"""Seeded synthetic workloads shared by the benchmarks and the load tests.

`sharegpt-synth`: ShareGPT-like lengths as the PagedAttention paper reports them (its Figure 11:
input mean about 161, output mean about 338 tokens, long-tailed). Prompt and output lengths are
lognormal with sigma 0.8 (a long tail), each at least 4 tokens, prompt + output <= 1024 (GPT-2's
context). The lognormal means (163, 376) are calibrated so that the means *after* that clipping
are 161 and 338 over a large sample (20,000 requests: 161.6 and 338.7). Fixed once chosen: the
numbers in docs/benchmarks.md are measured on exactly this distribution.

Served models with a shorter context (the default Shakespeare model has 512) get requests that
fit it, drawn from the same generator: a prompt that leaves fewer than 4 tokens of room is
redrawn (prompt and output length drawn again), and the output length is clipped to the room
left. For a 1024-token context nothing is redrawn or clipped further, so seed 0 draws exactly
the requests docs/benchmarks.md's numbers were measured on.
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


@dataclass(frozen=True)
class ModelLimits:
    """What a workload must respect to be served: the model's context and vocabulary."""

    context_length: int = MAX_TOTAL_LEN
    vocab_size: int = 50257


def sharegpt_synth(num_requests: int, seed: int = 0, limits: ModelLimits = ModelLimits()) -> list[Request]:
    if limits.context_length < 2 * MIN_LEN:
        raise ValueError(
            f"context_length {limits.context_length} leaves no room for a {MIN_LEN}-token prompt and output"
        )
    rng = np.random.default_rng(seed)
    mu_shift = -(SIGMA**2) / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    total = min(MAX_TOTAL_LEN, limits.context_length)
    requests = []
    for _ in range(num_requests):
        while True:
            prompt_len = int(rng.lognormal(math.log(LOGNORMAL_INPUT_MEAN) + mu_shift, SIGMA))
            output_len = int(rng.lognormal(math.log(LOGNORMAL_OUTPUT_MEAN) + mu_shift, SIGMA))
            prompt_len = min(max(prompt_len, MIN_LEN), MAX_TOTAL_LEN - MIN_LEN)
            if prompt_len <= total - MIN_LEN:
                break  # else: the prompt does not fit this model; draw again
        output_len = min(max(output_len, MIN_LEN), total - prompt_len)
        # Token ids avoid the last id (50256 in GPT-2, end-of-text) so no prompt contains it.
        prompt = rng.integers(0, limits.vocab_size - 1, size=prompt_len).tolist()
        requests.append(Request(prompt, output_len))
    return requests


def fixed_length(num_requests: int, prompt_tokens: int, new_tokens: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, 50256, size=prompt_tokens).tolist(), new_tokens) for _ in range(num_requests)]


def shared_prefix(
    num_groups: int,
    prompts_per_group: int,
    system_prompt_tokens: int,
    question_tokens: int,
    new_tokens: int,
    seed: int = 0,
    vocab_size: int = 50257,
) -> list[Request]:
    """SGLang's "generated shared prefix" workload: `num_groups` system prompts, each followed by
    `prompts_per_group` questions, in a seeded order that interleaves the groups."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, vocab_size - 1, system_prompt_tokens).tolist() for _ in range(num_groups)]
    requests = [
        Request(system + rng.integers(0, vocab_size - 1, question_tokens).tolist(), new_tokens)
        for system in systems
        for _ in range(prompts_per_group)
    ]
    return [requests[i] for i in rng.permutation(len(requests))]


WORKLOADS = {"sharegpt-synth": sharegpt_synth}


def served_model_limits(
    gateway_address: str, timeout_s: float = 30.0, api_key: str = "", tls_ca_file: str = ""
) -> ModelLimits:
    """Ask a running gateway what its model can take: GetModelInfo over gRPC (host:port), or
    GET /v1/models over HTTP (an http:// or https:// address). TLS is verified against
    `tls_ca_file` when given (a self-signed gateway's certificate), else the system's CAs."""
    if gateway_address.startswith(("http://", "https://")):
        import ssl

        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        card = (
            httpx.get(
                f"{gateway_address.rstrip('/')}/v1/models",
                headers=headers,
                timeout=timeout_s,
                verify=ssl.create_default_context(cafile=tls_ca_file or None),
            )
            .raise_for_status()
            .json()["data"][0]
        )
        return ModelLimits(card["max_model_len"], card["vocab_size"])
    from gateway.client import auth_metadata, gateway_channel
    from rpc.v1 import gateway_pb2, gateway_pb2_grpc

    with gateway_channel(gateway_address, tls_ca_file) as channel:
        info = gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(
            gateway_pb2.ModelInfoRequest(), timeout=timeout_s, wait_for_ready=True, metadata=auth_metadata(api_key)
        )
    return ModelLimits(info.context_length, info.vocab_size)


def describe(requests: list[Request]) -> str:
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.output_len for r in requests]
    return (
        f"{len(requests)} requests: prompt mean {np.mean(prompts):.1f} (max {max(prompts)}), "
        f"output mean {np.mean(outputs):.1f} (max {max(outputs)})"
    )
