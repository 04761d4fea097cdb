"""SamplingParams <-> protobuf, for the public API's message and the internal one alike.

The public (`rpc.v1`) and internal (`rpc.internal.v1`) protos each define their own
SamplingParams with the same field names, so these functions serve both. They only convert:
validation is `common.sampling_params`, applied once where a request enters a process.
"""

from __future__ import annotations

import json
from typing import TypeVar

from common.sampling_params import Constraint, SamplingParams, TokenLogprobs

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


def constraint_from_proto(message) -> Constraint | None:
    """The public StructuredOutput (a oneof) or the internal Constraint (kind + spec), unset = None."""
    if hasattr(message, "kind"):  # rpc.internal.v1.Constraint
        return Constraint(message.kind, message.spec) if message.kind else None
    kind = message.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "json_object" and not message.json_object:
        return None  # json_object: false asks for nothing
    if kind == "choice":
        return Constraint(kind, json.dumps(list(message.choice.choices)))
    return Constraint(kind, "" if kind == "json_object" else getattr(message, kind))


def sampling_params_from_proto(message) -> SamplingParams:
    """Unset optional fields take the SamplingParams defaults (seed: None)."""
    values = {name: getattr(message, name) for name in _OPTIONAL if message.HasField(name)}
    if message.HasField("structured_output"):
        values["structured_output"] = constraint_from_proto(message.structured_output)
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
    if params.structured_output is not None:  # only the replicas' proto carries one (the gateway sends it)
        message.structured_output.kind = params.structured_output.kind
        message.structured_output.spec = params.structured_output.spec
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
