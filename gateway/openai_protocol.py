"""OpenAI's completions and chat-completions requests, in our core's terms.

Parsing (pydantic, strict types, unknown fields refused as OpenAI does) turns a JSON body into a
`ClientRequest` (gateway/openai_answer.py builds the answers). Value rules (ranges, context
length) are the core's own validation (common.sampling_params), not repeated here: the front
only renames the field at fault (`param_name`) so an error names the field the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.sampling_params import (
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_STRINGS,
    Constraint,
    FieldError,
    SamplingParams,
    check_prompt_ids,
)
from gateway.api_types import ClientRequest
from gateway.chat_template import END_OF_TURN, ChatMessage, render
from gateway.core import GatewayCore


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # every schema is enforced (OpenAI's strict), so true or false alike


class ResponseFormat(_Strict):
    """OpenAI's response_format: text (free), json_object (any JSON object), json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def _constraint(
    response_format: ResponseFormat | None, outputs: StructuredOutputs | None
) -> tuple[Constraint | None, str]:
    """The request's constraint and the field that gave it (for error messages)."""
    if response_format is not None and response_format.type != "text" and outputs is not None:
        raise FieldError("structured_outputs", "give response_format or structured_outputs, not both")
    if response_format is not None and response_format.type == "json_object":
        return Constraint("json_object"), "response_format"
    if response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise FieldError("response_format", "response_format json_schema needs json_schema.schema")
        return Constraint("json_schema", json.dumps(response_format.json_schema.schema_)), "response_format"
    if outputs is None:
        return None, ""
    given = [
        (kind, value)
        for kind, value in (
            ("json_schema", outputs.json_),
            ("json_object", outputs.json_object or None),
            ("regex", outputs.regex),
            ("choice", outputs.choice),
            ("grammar", outputs.grammar),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise FieldError(
            "structured_outputs", "structured_outputs takes exactly one of json, json_object, regex, choice, grammar"
        )
    kind, value = given[0]
    if kind == "json_object":
        return Constraint(kind), "structured_outputs"
    spec = value if isinstance(value, str) and kind != "choice" else json.dumps(value)
    return Constraint(kind, spec), "structured_outputs"


class _Common(_Strict):
    model: str | None = None  # None = the served model
    temperature: float | None = None  # OpenAI's default 1
    top_p: float | None = None
    top_k: int | None = None  # extension, as vLLM
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # accepted, not used (OpenAI's abuse-monitoring id)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension, as vLLM
    cache_salt: str = ""  # extension, as vLLM: prefix-cache namespace
    presence_penalty: float | None = None  # OpenAI's default 0
    frequency_penalty: float | None = None  # OpenAI's default 0
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias
    repetition_penalty: float | None = None  # extension, as vLLM (HF's penalty); default 1
    min_tokens: int = 0  # extension, as vLLM
    stop_token_ids: list[int] | None = None  # extension, as vLLM
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # extension, as vLLM

    def refuse_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")

    def _logit_bias(self) -> dict[int, float]:
        """OpenAI's logit_bias keys are token ids written as strings."""
        if len(self.logit_bias or {}) > MAX_LOGIT_BIAS_TOKENS:  # bounded before each key is parsed
            raise FieldError("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > 10:
                raise FieldError("logit_bias", f"logit_bias keys must be token ids, got {key[:20]!r}")
            bias[int(key)] = value
        return bias

    def params(self, max_new_tokens: int, logprobs: int | None, extra_stop: list[str] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        extra = [s for s in extra_stop if s not in stop]
        if extra and len(stop) + len(extra) > MAX_STOP_STRINGS:
            raise FieldError(
                "stop",
                f"chat requests take at most {MAX_STOP_STRINGS - len(extra)} stop strings: the "
                f"chat template's end of turn {END_OF_TURN!r} is one of the {MAX_STOP_STRINGS}",
            )
        stop += extra
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            n=self.n,
            cache_salt=self.cache_salt,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self._logit_bias(),
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids or []),
            structured_output=_constraint(self.response_format, self.structured_outputs)[0],
        )

    @property
    def constraint_field(self) -> str:
        """The field the client gave its constraint in, for an error about it."""
        return _constraint(self.response_format, self.structured_outputs)[1]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: Any  # a string, or a list of token ids (checked in `prompt_ids`)
    max_tokens: int | None = 16  # OpenAI's default; None = up to the context
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None  # neutral only
    best_of: int | None = None  # neutral only (= n)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def message(self) -> ChatMessage:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(self.role, content, self.name or "")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn]
    max_tokens: int | None = None  # deprecated by OpenAI for max_completion_tokens; either works
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclass
class Prepared:
    """A parsed OpenAI request as the core's request, with what the answer needs."""

    request: ClientRequest
    prompt_ids: list[int]
    prompt_text: str
    param_names: dict[str, str] = field(default_factory=dict)  # core field -> the client's field

    def param_name(self, core_field: str) -> str | None:
        return self.param_names.get(core_field, core_field) or None


def _default_max_tokens(requested: int | None, prompt_ids: list[int], context_length: int) -> int:
    """Up to the context when the client set no limit (a too-long prompt is then the error)."""
    return requested if requested is not None else max(context_length - len(prompt_ids), 1)


async def prompt_ids(prompt: Any, core: GatewayCore) -> list[int]:
    """OpenAI's prompt: a string, a list of token ids, or a one-element list of either. Bounded and
    checked before anything reads it: a text by the core's size bound (then tokenized off the event
    loop), ids by count and range (an id outside the vocabulary is never decoded, e.g. for echo)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await core.tokenize(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        check_prompt_ids(prompt, core.model_info.context_length, core.model_info.vocab_size)
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise FieldError("prompt", "batched prompts are not supported: send one request per prompt")
    raise FieldError("prompt", "prompt must be a string or a list of token ids")


async def prepare_completion(body: CompletionRequest, request_id: str, core: GatewayCore) -> Prepared:
    body.refuse_unsupported()
    if body.suffix:
        raise FieldError("suffix", "suffix is not supported by this server")
    if body.best_of not in (None, body.n):
        raise FieldError("best_of", "best_of is not supported by this server (only equal to n)")
    if body.echo and body.logprobs is not None:
        raise FieldError("echo", "echo with logprobs needs the prompt's logprobs, which this server does not compute")
    ids = await prompt_ids(body.prompt, core)
    names = {"max_new_tokens": "max_tokens", "structured_output": body.constraint_field}
    params = body.params(_default_max_tokens(body.max_tokens, ids, core.model_info.context_length), body.logprobs)
    return Prepared(ClientRequest(ids, params, request_id), ids, core.tokenizer.decode(ids) if body.echo else "", names)


async def prepare_chat(body: ChatCompletionRequest, request_id: str, core: GatewayCore) -> Prepared:
    body.refuse_unsupported()
    if body.top_logprobs is not None and not body.logprobs:
        raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
    text = render([m.message() for m in body.messages])  # linear in the body, which is bounded
    ids = await core.tokenize(text, "messages")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    names = {
        "max_new_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
        "logprobs": "top_logprobs",
        "prompt": "messages",
        "structured_output": body.constraint_field,
    }
    params = body.params(_default_max_tokens(limit, ids, core.model_info.context_length), logprobs, [END_OF_TURN])
    return Prepared(ClientRequest(ids, params, request_id), ids, text, names)
