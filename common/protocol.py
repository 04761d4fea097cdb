"""protobuf <-> domain objects for generation requests, shared by the gateway and compute.

Every ValueError names the request field at fault; servicers turn it into INVALID_ARGUMENT.
"""
from __future__ import annotations

from compute_service.sampling_params import SamplingParams
from compute_service.tokenizer import Tokenizer
from rpc.v1 import generate_pb2


def prompt_token_ids(request: generate_pb2.GenerateRequest, tokenizer: Tokenizer) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind == "token_ids":
        return list(request.token_ids.ids)
    if kind == "text":
        try:
            text = request.text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompt.text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not text:
            raise ValueError("prompt must not be empty")
        return tokenizer.encode(text)
    raise ValueError("prompt must be set: give prompt text or prompt token_ids")


def sampling_params(message: generate_pb2.SamplingParams) -> SamplingParams:
    """Proto params to SamplingParams; unset optional fields take the SamplingParams defaults."""
    defaults = SamplingParams()
    params = SamplingParams(
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else defaults.max_new_tokens,
        temperature=message.temperature if message.HasField("temperature") else defaults.temperature,
        top_k=message.top_k if message.HasField("top_k") else defaults.top_k,
        top_p=message.top_p if message.HasField("top_p") else defaults.top_p,
        seed=message.seed if message.HasField("seed") else None,
        stop=list(message.stop),
        ignore_eos=message.ignore_eos,
    )
    params.validate()
    return params


def params_to_proto(params: SamplingParams) -> generate_pb2.SamplingParams:
    message = generate_pb2.SamplingParams(
        max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, stop=params.stop, ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


class IncrementalText:
    """Text deltas for streamed tokens: a split UTF-8 character, or what could still turn into a
    stop string, is held back until it is settled."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent += len(delta)
        return delta

    def finish(self, final_text: str) -> str:
        """What is left of the final (stop-truncated) text."""
        rest = final_text[self.sent:]
        self.sent = len(final_text)
        return rest
