"""OpenAI's answers built from the core's events: the whole JSON object of a request that was not
streamed, or its server-sent events (chunks, usage, `[DONE]`) for one that was."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from common.sampling_params import TokenLogprobs
from common.tokenizer import Tokenizer
from gateway.api_types import Completion, GatewayError, TokenChunk
from gateway.openai_protocol import Prepared

# Our finish reasons as OpenAI's (an EOS token is a natural stop, as OpenAI reports it).
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as logprobs name it: its text, or OpenAI's `bytes:\\xNN...` for a token that is not
    whole UTF-8 (part of a character), so distinct tokens never share a name."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Answer:
    """One request's answer as it is built: per choice its text, tokens, logprobs and Completion.
    `chunk` and `finish` give a stream's choice objects, `result` the whole answer."""

    def __init__(self, chat: bool, prepared: Prepared, model: str, tokenizer: Tokenizer) -> None:
        self.chat, self.prepared, self.model, self.tokenizer = chat, prepared, model, tokenizer
        self.want_logprobs = prepared.request.params.logprobs is not None
        n = prepared.request.params.n
        self.texts = [prepared.prompt_text if not chat else "" for _ in range(n)]  # echo starts with the prompt
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        self.offsets = [len(prepared.prompt_text) if not chat else 0] * n  # text_offset of each choice's next token
        self.completions: dict[int, Completion] = {}
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{prepared.request.request_id}"
        self.created = int(time.time())  # one value for the answer and every chunk of it

    def envelope(self, choices: list[dict], stream: bool, **extra: Any) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _logprobs(self, index: int, ids: list[int], lps: list[TokenLogprobs]) -> dict | None:
        if not self.want_logprobs:
            return None
        names = [token_string(self.tokenizer, t) for t in ids]
        if self.chat:

            def entry(token_id: int, name: str, value: float) -> dict:
                return {"token": name, "logprob": value, "bytes": list(self.tokenizer.token_bytes(token_id))}

            return {
                "content": [
                    {
                        **entry(t, name, lp.logprob),
                        "top_logprobs": [entry(i, token_string(self.tokenizer, i), v) for i, v in lp.top],
                    }
                    for t, name, lp in zip(ids, names, lps, strict=False)
                ]
            }
        offsets = []
        for name in names:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(name)
        return {
            "tokens": names,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_string(self.tokenizer, t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def _choice(self, index: int, text: str | None, logprobs: dict | None, reason: str | None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def opening(self) -> list[dict]:
        """The first stream chunk's choices: the role (chat) or the echoed prompt (completions)."""
        if self.chat:
            return [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.texts))
            ]
        return [self._choice(i, t, None, None) for i, t in enumerate(self.texts) if t]

    def chunk(self, event: TokenChunk) -> dict | None:
        """A TokenChunk's choice object. A token whose text is held back (half a UTF-8 character, a
        possible stop string) still gets one, with empty text: the client sees every token when
        it is made, as over gRPC."""
        self.add(event)
        if not event.text and not event.token_ids:
            return None
        return self._choice(event.index, event.text, self._logprobs(event.index, event.token_ids, event.logprobs), None)

    def add(self, event: TokenChunk) -> None:
        i = event.index
        self.texts[i] += event.text
        self.token_ids[i] += event.token_ids
        self.logprobs[i] += event.logprobs

    def finish(self, done: Completion) -> dict:
        self.completions[done.index] = done
        return self._choice(done.index, None if self.chat else "", None, self.finish_reason(done.index))

    def finish_reason(self, index: int) -> str:
        reason = self.completions[index].finish_reason
        return FINISH_REASONS.get(reason, reason)

    def usage(self) -> dict:
        prompt = len(self.prepared.prompt_ids)
        completion = sum(c.completion_tokens for c in self.completions.values())
        # n > 1: the samples after the first find the prompt the first computed, so the request's
        # own hit is the smallest; after a continuation elsewhere a hit may include generated
        # tokens: at most the prompt
        cached = min(min((c.cached_tokens for c in self.completions.values()), default=0), prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def result(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            logprobs = self._logprobs(i, self.token_ids[i], self.logprobs[i])
            if self.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": self.finish_reason(i),
                    }
                )
            else:
                choices.append(self._choice(i, text, logprobs, self.finish_reason(i)))
        return self.envelope(choices, stream=False, usage=self.usage())


async def collect(answer: Answer, first, events: AsyncIterator) -> dict:
    """Every event into `answer`; its whole JSON object."""
    async with contextlib.aclosing(events):
        event = first
        while event is not None:
            if isinstance(event, Completion):
                answer.finish(event)
            else:
                answer.add(event)
            event = await anext(events, None)
    return answer.result()


async def stream(
    answer: Answer, first, events: AsyncIterator, include_usage: bool, error_body: Callable[[GatewayError], dict]
) -> AsyncIterator[str]:
    """Server-sent events: the opening chunk, one per TokenChunk and per finished choice, the usage
    chunk if asked, then [DONE]. A failure after the first event becomes an error event."""
    extra = {"usage": None} if include_usage else {}
    async with contextlib.aclosing(events):
        opening = answer.opening()
        if opening:
            yield sse(answer.envelope(opening, stream=True, **extra))
        event = first
        try:
            while event is not None:
                choice = answer.finish(event) if isinstance(event, Completion) else answer.chunk(event)
                if choice is not None:
                    yield sse(answer.envelope([choice], stream=True, **extra))
                event = await anext(events, None)
        except GatewayError as exc:
            yield sse(error_body(exc))
            yield sse("[DONE]")
            return
    if include_usage:
        yield sse(answer.envelope([], stream=True, usage=answer.usage()))
    yield sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    """A server-sent-event response that always closes its generator and the core's events when
    it ends, however it ends (the client gone mid-send, or before the first byte; a client that
    stopped reading is dropped by the protocol's write bound, gateway/http_bounds.py): closing them
    cancels the replica's call at once, rather than whenever the garbage collector runs."""

    def __init__(self, body: AsyncIterator[str], events: AsyncIterator) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._events.aclose()
