"""What the fronts (gRPC, OpenAI HTTP) and GatewayCore exchange: a request in, token chunks and
completions out, the model's facts, and the one error type every front maps onto its protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.sampling_params import SamplingParams, TokenLogprobs


class GatewayError(Exception):
    """A request the gateway cannot serve. `status` is a gRPC status name (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, UNAVAILABLE, ...); every front maps it onto its own protocol. `field`
    names the request field at fault (SamplingParams' names, or "prompt"), when one is.
    `retry_after_s`: when a refused request could succeed again (a per-tenant limit), if known."""

    def __init__(self, status: str, message: str, field: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


@dataclass
class ClientRequest:
    prompt: str | bytes | list[int] | None  # text (bytes: checked to be UTF-8) is tokenized here
    params: SamplingParams
    request_id: str = ""  # empty = the gateway makes one; unique among its tenant's requests in flight
    tenant: str = ""  # whose request: the API key's tenant (gateway/auth.py); "" without keys


@dataclass
class TokenChunk:
    token_ids: list[int]
    text: str
    index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when asked for


@dataclass
class Completion:
    request_id: str
    finish_reason: str  # length | stop | eos | abort
    prompt_tokens: int
    completion_tokens: int
    num_preemptions: int
    replica: str
    seed: int  # what it sampled with: the request's, or one the gateway chose
    num_migrations: int  # times it was continued on another replica
    timings: dict[str, float]  # queue_ms (the engine's), ttft_ms, tpot_ms, e2e_ms (the gateway's clock)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    index: int = 0  # which sample this ends (a request with n samples ends with n Completions)
    matched_tokens: int = 0  # prompt tokens routing saw held on the replica it chose (kv-aware)


@dataclass
class ModelInfo:
    model: str
    context_length: int
    block_size: int
    mode: str
    vocab_size: int
