"""The OpenAI-compatible HTTP front (FastAPI on uvicorn, in the gateway's process and event loop):
/v1/completions, /v1/chat/completions, /v1/models, vLLM's /tokenize and /detokenize, /health and
/metrics over the same core as gRPC (validation, routing, migration, metrics, cancellation).

Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) with the status of
STATUSES. A streamed request waits for its first event before answering, so anything that fails
before the first token gets its real status; a failure after it arrives as an `error` event, then
`data: [DONE]`. A client that disconnects cancels its request (stream or not), which frees its
blocks on the replica, as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from common.sampling_params import FieldError
from gateway.api_types import GatewayError, ModelInfo
from gateway.auth import ApiKeys
from gateway.core import GatewayCore
from gateway.http_bounds import CLOSE, BodyLimit, HttpBounds
from gateway.openai_answer import Answer, EventStreamResponse, collect, stream
from gateway.openai_errors import OpenAIError
from gateway.openai_protocol import ChatCompletionRequest, CompletionRequest, prepare_chat, prepare_completion
from gateway.tokenize_api import TOKEN_PATHS, DetokenizeRequest, TokenizeRequest, detokenize, tokenize

log = logging.getLogger("gateway")


class _RequireKey:
    """ASGI middleware: a /v1/ (or /tokenize, /detokenize) request without a valid key is refused
    before its body is read; a valid one's tenant goes into the scope (`scope["tenant"]`) for the routes."""

    def __init__(self, app, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path in TOKEN_PATHS) and self.keys.enabled:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scope["tenant"] = self.keys.tenant(authorization)
            if scope["tenant"] is None:
                error = OpenAIError(
                    "UNAUTHENTICATED",
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers=CLOSE,
                )  # its body is never read
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


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
        return task.result() if task.done() else None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def create_app(core: GatewayCore, keys: ApiKeys, bounds: HttpBounds | None = None) -> FastAPI:
    """The app; `app.state.draining = True` turns /health to 503 while the gateway drains. The key
    check runs before the body is read, the body bound (`bounds`) before any route parses it."""
    # No /docs: Swagger UI loads from a CDN. The schema stays at /openapi.json.
    app = FastAPI(title="paged-nanogpt gateway (OpenAI-compatible)", docs_url=None, redoc_url=None)
    app.state.draining = False
    if bounds is not None:
        app.add_middleware(BodyLimit, bounds=bounds)
    app.add_middleware(_RequireKey, keys=keys)  # added last = runs first

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug, not the client's: logged with an id, answered with the id and no internals
        (Starlette's own answer would be a plain-text 500)."""
        error_id = uuid.uuid4().hex[:12]
        log.error("%s %s failed (error id %s)", request.method, request.url.path, error_id, exc_info=exc)
        return OpenAIError("INTERNAL", f"internal error (id {error_id}; the server's log has the details)").response()

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = [str(part) for part in error["loc"] if part != "body"]
        param = where[0] if where else None
        if error["type"] == "json_invalid":
            return OpenAIError("INVALID_ARGUMENT", "the request body is not valid JSON").response()
        if error["type"] == "extra_forbidden":
            return OpenAIError(
                "INVALID_ARGUMENT", f"Unrecognized request argument supplied: {'.'.join(where)}", param
            ).response()
        return OpenAIError("INVALID_ARGUMENT", f"{'.'.join(where) or 'body'}: {error['msg']}", param).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        status = "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT"
        return OpenAIError(
            status,
            f"{request.method} {request.url.path}: {exc.detail}",
            http_status=exc.status_code,
            headers=exc.headers,
        ).response()

    def model_info(requested: str | None = None) -> ModelInfo:
        try:
            info = core.model_info
        except GatewayError as exc:
            raise OpenAIError.from_gateway(exc) from None
        if requested not in (None, info.model):
            raise OpenAIError(
                "NOT_FOUND",
                f"the model {requested!r} does not exist; this server serves {info.model!r}",
                "model",
                "model_not_found",
            )
        return info

    async def run(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
        info = model_info(body.model)
        try:
            prepared = await (prepare_chat if chat else prepare_completion)(body, uuid.uuid4().hex, core)
        except FieldError as exc:
            raise OpenAIError("INVALID_ARGUMENT", str(exc), exc.field) from None
        prepared.request.tenant = request.scope.get("tenant") or ""
        events = core.generate(prepared.request)
        streaming = False
        try:
            first = await _until_disconnect(request, anext(events, None))
            if first is None:  # the client left before the first token: generate() was cancelled
                return Response(status_code=499)
            # Shaped by n and logprobs: built once the core has validated them (a first event came).
            answer = Answer(chat, prepared, info.model, core.tokenizer)
            if body.stream:
                body_iterator = stream(
                    answer,
                    first,
                    events,
                    body.include_usage,
                    lambda exc: OpenAIError.from_gateway(exc, prepared).body(),
                )
                streaming = True
                return EventStreamResponse(body_iterator, events)  # it closes `events` when it ends
            result = await _until_disconnect(request, collect(answer, first, events))
        except GatewayError as exc:
            raise OpenAIError.from_gateway(exc, prepared) from None
        finally:
            if not streaming:  # ended, failed or abandoned: make sure the replica's call is gone now
                await events.aclose()
        return JSONResponse(result) if result is not None else Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await run(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await run(request, body, chat=True)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict:
        model_info(body.model)
        try:
            return await tokenize(body, core)
        except FieldError as exc:
            raise OpenAIError("INVALID_ARGUMENT", str(exc), exc.field) from None

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict:
        model_info(body.model)
        try:
            return detokenize(body, core)
        except FieldError as exc:
            raise OpenAIError("INVALID_ARGUMENT", str(exc), exc.field) from None

    @app.get("/v1/models")
    async def models() -> dict:
        info = model_info()
        return {
            "object": "list",
            "data": [
                {
                    "id": info.model,
                    "object": "model",
                    "created": 0,
                    "owned_by": "paged-nanogpt",
                    "max_model_len": info.context_length,
                    "vocab_size": info.vocab_size,
                }
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        serving = sum(r.serving for r in core.replicas.replicas)
        try:
            status = "draining" if app.state.draining else "ok" if core.model_info and serving else "unavailable"
        except GatewayError:  # no replica has told the model yet
            status = "unavailable"
        return JSONResponse({"status": status, "replicas_serving": serving}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if keys.enabled:  # the per-tenant series name every tenant: not for the public port
            raise OpenAIError("NOT_FOUND", "with API keys, metrics are served on the metrics port only (metrics_port)")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
