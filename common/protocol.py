"""SamplingParams <-> protobuf, for the public API's message and the internal one alike.

The public (`rpc.v1`) and internal (`rpc.internal.v1`) protos each define their own
SamplingParams with the same field names, so these functions serve both. They only convert:
validation is `common.sampling_params`, applied once where a request enters a process.
"""

from __future__ import annotations

from typing import TypeVar

from common.sampling_params import SamplingParams, TokenLogprobs

M = TypeVar("M")
_OPTIONAL = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "n",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def sampling_params_from_proto(message) -> SamplingParams:
    """Unset optional fields take the SamplingParams defaults (seed: None)."""
    values = {name: getattr(message, name) for name in _OPTIONAL if message.HasField(name)}
    return SamplingParams(
        **values,
        stop=list(message.stop),
        ignore_eos=message.ignore_eos,
        cache_salt=message.cache_salt,
        logit_bias=dict(message.logit_bias),
        min_tokens=message.min_tokens,
        stop_token_ids=list(message.stop_token_ids),
    )


def sampling_params_to_proto(params: SamplingParams, message_cls: type[M]) -> M:
    """Every field set explicitly, so the receiver applies no defaults of its own."""
    message = message_cls(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
        n=params.n,
        cache_salt=params.cache_salt,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=params.logit_bias,
        min_tokens=params.min_tokens,
        stop_token_ids=params.stop_token_ids,
    )
    if params.seed is not None:
        message.seed = params.seed
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    return message


def logprobs_to_proto(logprobs: list[TokenLogprobs], message_cls: type[M]) -> list[M]:
    """TokenLogprobs as the TokenLogprobs message of either proto (same field names)."""
    return [
        message_cls(logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top])
        for lp in logprobs
    ]


def logprobs_from_proto(messages) -> list[TokenLogprobs]:
    return [TokenLogprobs(m.logprob, list(zip(m.top_token_ids, m.top_logprobs, strict=False))) for m in messages]
