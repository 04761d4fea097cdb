"""vLLM's /tokenize and /detokenize, in vLLM's shapes: what a client needs to count a prompt
against the context, or to read token ids (logprobs, logit_bias keys) as text, without a
tokenizer of its own. Bounded as prompts are: a text by the core's size bound (tokenized off the
event loop when long), ids by count and vocabulary before any is decoded. Behind the API key, as
/v1/ is (gateway.openai_api).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from common.sampling_params import FieldError, check_prompt_ids
from gateway.chat_template import render
from gateway.core import GatewayCore
from gateway.openai_protocol import ChatMessageIn

TOKEN_PATHS = ("/tokenize", "/detokenize")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenizeRequest(_Strict):
    """A prompt (completions) or messages (chat, rendered with the chat template as a chat
    request's prompt is); `add_special_tokens` is accepted for vLLM's clients: GPT-2 adds none."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


async def tokenize(body: TokenizeRequest, core: GatewayCore) -> dict:
    """{"count", "max_model_len", "tokens", "token_strs"}; FieldError names `prompt`/`messages`."""
    if (body.prompt is None) == (body.messages is None):
        raise FieldError("prompt", "give exactly one of prompt or messages")
    if body.messages is not None:
        ids = await core.tokenize(render([m.message() for m in body.messages]), "messages")
    else:
        ids = await core.tokenize(body.prompt, "prompt")
    strs = [core.tokenizer.decode([t]) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": core.model_info.context_length, "tokens": ids, "token_strs": strs}


def detokenize(body: DetokenizeRequest, core: GatewayCore) -> dict:
    """{"prompt": text}; the ids are checked (count below the context, each in the vocabulary)
    before any is decoded."""
    info = core.model_info
    check_prompt_ids(body.tokens, info.context_length, info.vocab_size, "tokens")
    return {"prompt": core.tokenizer.decode(body.tokens)}
