"""The OpenAI-compatible HTTP front (FastAPI on uvicorn, in the gateway's process and event loop):
/v1/completions, /v1/chat/completions, /v1/models, /health and /metrics over the same core as
gRPC (validation, routing, migration, metrics, cancellation).

Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) with the status of
STATUSES. A streamed request waits for its first event before answering, so anything that fails
before the first token gets its real status; a failure after it arrives as an `error` event, then
`data: [DONE]`. A client that disconnects cancels its request (stream or not), which frees its
blocks on the replica, as a cancelled gRPC call does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from common.sampling_params import FieldError
from gateway.auth import ApiKeys
from gateway.core import Completion, GatewayCore, GatewayError, TokenChunk
from gateway.openai_protocol import (FINISH_REASONS, ChatCompletionRequest, CompletionRequest, Prepared,
                                     chat_logprobs, completion_logprobs, envelope, prepare_chat,
                                     prepare_completion, usage)

# The core's gRPC status names as HTTP statuses and OpenAI error types.
STATUSES = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"), "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "invalid_request_error"), "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"), "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"), "INTERNAL": (500, "internal_error"),
}


class OpenAIError(Exception):
    def __init__(self, status: str, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = STATUSES.get(self.status, STATUSES["INTERNAL"])[1]
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code or self.status.lower()}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=STATUSES.get(self.status, STATUSES["INTERNAL"])[0])


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def _until_disconnect(request: Request, awaitable):
    """Await `awaitable` unless the client disconnects first: then cancel it (which cancels the
    replica's call) and return None."""
    task = asyncio.ensure_future(awaitable)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _Answer:
    """One request's answer being built: per choice its text, tokens, logprobs and Completion;
    `chunk` and `finish` give the stream's choice objects, `result` the whole answer's."""

    def __init__(self, chat: bool, prepared: Prepared, model: str, core: GatewayCore, want_logprobs: bool) -> None:
        self.chat, self.prepared, self.model, self.tokenizer = chat, prepared, model, core.tokenizer
        self.want_logprobs = want_logprobs
        n = prepared.request.params.n
        self.texts = [prepared.prompt_text if not chat else "" for _ in range(n)]  # echo starts with the prompt
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.completions: dict[int, Completion] = {}
        self.kind = "chat.completion" if chat else "text_completion"
        self.request_id = prepared.request.request_id

    def _logprobs(self, ids: list[int], lps: list, offset: int) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, ids, lps)
        return completion_logprobs(self.tokenizer, ids, lps, offset)

    def opening(self) -> list[dict]:
        """The first stream chunk's choices: the role (chat) or the echoed prompt (completions)."""
        if self.chat:
            return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(len(self.texts))]
        return [{"index": i, "text": t, "logprobs": None, "finish_reason": None}
                for i, t in enumerate(self.texts) if t]

    def chunk(self, event: TokenChunk) -> dict | None:
        i = event.index
        offset = len(self.texts[i])
        self.texts[i] += event.text
        self.token_ids[i] += event.token_ids
        self.logprobs[i] += event.logprobs
        if not event.text and not event.token_ids:
            return None
        # A token whose text is held back (half a UTF-8 character, a possible stop string) is still
        # sent, with empty text: the client sees every token when it is made, as over gRPC.
        logprobs = self._logprobs(event.token_ids, event.logprobs, offset)
        if self.chat:
            return {"index": i, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}
        return {"index": i, "text": event.text, "logprobs": logprobs, "finish_reason": None}

    def finish(self, done: Completion) -> dict:
        self.completions[done.index] = done
        reason = FINISH_REASONS.get(done.finish_reason, done.finish_reason)
        if self.chat:
            return {"index": done.index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": done.index, "text": "", "logprobs": None, "finish_reason": reason}

    def usage(self) -> dict:
        return usage(len(self.prepared.prompt_ids), list(self.completions.values()))

    def result(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            reason = FINISH_REASONS.get(self.completions[i].finish_reason, self.completions[i].finish_reason)
            logprobs = self._logprobs(self.token_ids[i], self.logprobs[i], len(self.prepared.prompt_text))
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
        return envelope(self.kind, self.request_id, self.model, choices, usage=self.usage())


def create_app(core: GatewayCore, keys: ApiKeys) -> FastAPI:
    # No /docs: Swagger UI loads from a CDN. The schema stays at /openapi.json.
    app = FastAPI(title="paged-nanogpt gateway (OpenAI-compatible)", docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = [str(part) for part in error["loc"] if part != "body"]
        if error["type"] == "json_invalid":
            return OpenAIError("INVALID_ARGUMENT", "the request body is not valid JSON").response()
        if error["type"] == "extra_forbidden":
            return OpenAIError("INVALID_ARGUMENT", f"Unrecognized request argument supplied: {'.'.join(where)}",
                               where[0] if where else None).response()
        message = f"{'.'.join(where) or 'body'}: {error['msg']}"
        return OpenAIError("INVALID_ARGUMENT", message, where[0] if where else None).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        status = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT"}.get(exc.status_code, "INVALID_ARGUMENT")
        error = OpenAIError(status, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    def authorize(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise OpenAIError("UNAUTHENTICATED", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    def served_model(requested: str | None) -> str:
        info = _model_info(core)
        if requested not in (None, info.model):
            raise OpenAIError("NOT_FOUND", f"the model {requested!r} does not exist; this server serves "
                              f"{info.model!r}", "model", "model_not_found")
        return info.model

    async def run(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
        authorize(request)
        model = served_model(body.model)
        info = _model_info(core)
        prepare = prepare_chat if chat else prepare_completion
        try:
            prepared = prepare(body, uuid.uuid4().hex, core.tokenizer, info.context_length)
        except FieldError as exc:
            raise OpenAIError("INVALID_ARGUMENT", str(exc), exc.field) from None
        want_logprobs = prepared.request.params.logprobs is not None
        answer = _Answer(chat, prepared, model, core, want_logprobs)
        events = core.generate(prepared.request)
        try:
            first = await _until_disconnect(request, anext(events, None))
        except GatewayError as exc:
            param = prepared.param_name(exc.field) if exc.field else None
            message = exc.message.replace(exc.field, param) if exc.field and param else exc.message
            raise OpenAIError(exc.status, message, param) from None
        if first is None:  # the client left before the first token: generate() was cancelled
            await events.aclose()
            return Response(status_code=499)
        if body.stream:
            return StreamingResponse(_stream(answer, first, events, body.include_usage), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        result = await _until_disconnect(request, _collect(answer, first, events))
        return JSONResponse(result) if result is not None else Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await run(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await run(request, body, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        info = _model_info(core)
        return {"object": "list", "data": [{"id": info.model, "object": "model", "created": 0,
                                            "owned_by": "paged-nanogpt", "max_model_len": info.context_length,
                                            "vocab_size": info.vocab_size}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = sum(r.serving for r in core.router.replicas)
        try:
            ok = core.model_info is not None and serving > 0
        except GatewayError:  # no replica has told the model yet
            ok = False
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas_serving": serving},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _model_info(core: GatewayCore):
    try:
        return core.model_info
    except GatewayError as exc:
        raise OpenAIError(exc.status, exc.message) from None


async def _collect(answer: _Answer, first, events) -> dict:
    async with contextlib.aclosing(events):
        event = first
        while event is not None:
            if isinstance(event, Completion):
                answer.finish(event)
            else:
                answer.chunk(event)
            event = await anext(events, None)
    return answer.result()


async def _stream(answer: _Answer, first, events, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the opening chunk, one per TokenChunk and per finished choice, the usage
    chunk if asked, then [DONE]. Cancelled when the client disconnects (uvicorn tells Starlette),
    which closes `events` and so cancels the replica's call."""
    chunk_kind = "chat.completion.chunk" if answer.chat else "text_completion"
    extra = {"usage": None} if include_usage else {}
    async with contextlib.aclosing(events):
        opening = answer.opening()
        if opening:
            yield _sse(envelope(chunk_kind, answer.request_id, answer.model, opening, **extra))
        event = first
        try:
            while event is not None:
                choice = answer.finish(event) if isinstance(event, Completion) else answer.chunk(event)
                if choice is not None:
                    yield _sse(envelope(chunk_kind, answer.request_id, answer.model, [choice], **extra))
                event = await anext(events, None)
        except GatewayError as exc:
            yield _sse(OpenAIError(exc.status, exc.message).body())
            yield _sse("[DONE]")
            return
    if include_usage:
        yield _sse(envelope(chunk_kind, answer.request_id, answer.model, [], usage=answer.usage()))
    yield _sse("[DONE]")
