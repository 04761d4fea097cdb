"""The gateway's transport-free core: validation, routing with retry, the abort registry and the
metrics of every request, whatever front (gRPC today) a client came through.

A front turns its own request into a `ClientRequest`, iterates `generate()` for `TokenChunk`s and
one final `Completion`, and maps a `GatewayError`'s status (a gRPC status name) onto its own
protocol. The core talks to compute replicas over the internal API (rpc.internal.v1).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from common.grpc_server import CHANNEL_OPTIONS
from common.protocol import sampling_params_to_proto
from common.sampling_params import SamplingParams, validate_request
from common.tokenizer import get_tokenizer
from gateway.config import GatewayConfig
from gateway.metrics import IN_FLIGHT, GatewayMetrics, RequestTimer
from gateway.router import ReplicaRouter
from rpc.internal.v1 import compute_pb2, memory_pb2, memory_pb2_grpc

log = logging.getLogger("gateway")
# Replica statuses a client may see as they are; any other failure is the replica's, not the
# client's, and becomes UNAVAILABLE.
_PASS_THROUGH = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS", "DEADLINE_EXCEEDED"}


class GatewayError(Exception):
    """A request the gateway cannot serve. `status` is a gRPC status name (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, UNAVAILABLE, ...); every front maps it onto its own protocol."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ClientRequest:
    prompt: str | list[int]  # text is tokenized here
    params: SamplingParams
    request_id: str = ""  # empty = the gateway makes one


@dataclass
class TokenChunk:
    token_ids: list[int]
    text: str


@dataclass
class Completion:
    request_id: str
    finish_reason: str  # length | stop | eos | abort
    prompt_tokens: int
    completion_tokens: int
    num_preemptions: int
    replica: str
    timings: dict[str, float]  # queue_ms (the engine's), ttft_ms, tpot_ms, e2e_ms (the gateway's clock)


@dataclass
class ModelInfo:
    model: str
    context_length: int
    block_size: int
    mode: str
    vocab_size: int
    replicas: int


class GatewayCore:
    def __init__(self, config: GatewayConfig, router: ReplicaRouter) -> None:
        self.config = config
        self.router = router
        self.tokenizer = get_tokenizer()
        self.metrics = GatewayMetrics()
        self._model_info: ModelInfo | None = None
        self._calls: dict[str, grpc.aio.UnaryStreamCall] = {}
        self._aborted: set[str] = set()
        self._memory = None
        if config.memory_address:
            channel = grpc.aio.insecure_channel(config.memory_address, options=CHANNEL_OPTIONS)
            self._memory = memory_pb2_grpc.MemoryServiceStub(channel)

    async def start(self) -> ModelInfo:
        """Wait for a compute replica to tell the model's facts (requests fail UNAVAILABLE until then)."""
        info = await self.router.info(self.config.startup_timeout_s)
        self._model_info = ModelInfo(info.model, info.context_length, info.block_size, info.mode, info.vocab_size,
                                     len(self.router.replicas))
        return self._model_info

    @property
    def model_info(self) -> ModelInfo:
        if self._model_info is None:
            raise GatewayError("UNAVAILABLE", "gateway is starting: no compute replica has answered yet")
        return self._model_info

    @property
    def num_in_flight(self) -> int:
        return len(self._calls)

    def _forward_request(self, request: ClientRequest) -> compute_pb2.GenerateRequest:
        """The request as a replica gets it (token ids, every parameter explicit, an id), after
        the one validation this process applies; ValueError names the field at fault."""
        info = self.model_info
        prompt = self.tokenizer.encode(request.prompt) if isinstance(request.prompt, str) else list(request.prompt)
        validate_request(prompt, request.params, info.context_length, info.vocab_size)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._calls:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        return compute_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                           params=sampling_params_to_proto(request.params, compute_pb2.SamplingParams))

    async def generate(self, request: ClientRequest,
                       timeout_s: float | None = None) -> AsyncIterator[TokenChunk | Completion]:
        """Stream one request from a compute replica: TokenChunks, then one Completion. Raises
        GatewayError; a front that stops iterating must close the generator (aclosing) so the
        replica's call is cancelled and its blocks freed."""
        timer = RequestTimer()
        try:
            forward = self._forward_request(request)
        except ValueError as exc:
            self.metrics.record_request("INVALID_ARGUMENT", timer, None)
            raise GatewayError("INVALID_ARGUMENT", str(exc)) from None
        if len(self._calls) >= self.config.max_in_flight:
            self.metrics.record_request("RESOURCE_EXHAUSTED", timer, None)
            raise GatewayError("RESOURCE_EXHAUSTED", "gateway is at max_in_flight; retry later")
        request_id, status, queue_ms, tried = forward.request_id, None, None, set()
        IN_FLIGHT.inc()
        try:
            while True:
                replica = self.router.pick(exclude=tried)
                if replica is None:
                    status = "UNAVAILABLE"
                    raise GatewayError(status, "no compute replica is reachable")
                tried.add(replica.address)
                call = replica.stub.Generate(forward, timeout=timeout_s)
                self._calls[request_id] = call
                replica.in_flight += 1
                try:
                    async for response in call:
                        if response.HasField("chunk"):
                            if response.chunk.token_ids:
                                timer.on_tokens(len(response.chunk.token_ids))
                                self.metrics.record_tokens(len(response.chunk.token_ids))
                            yield TokenChunk(list(response.chunk.token_ids), response.chunk.text)
                        elif response.HasField("complete"):
                            done = response.complete
                            queue_ms = done.queue_ms
                            status = "OK"
                            yield Completion(request_id, done.finish_reason, done.prompt_tokens, done.completion_tokens,
                                             done.num_preemptions, done.replica, dict(queue_ms=queue_ms, **timer.timings()))
                    return
                except asyncio.CancelledError:
                    if request_id not in self._aborted:
                        status = "CANCELLED"
                        raise  # the client went away; `finally` cancels the upstream call
                    status = "OK"
                    yield Completion(request_id, "abort", len(forward.prompt_token_ids), timer.num_tokens, 0,
                                     replica.address, dict(queue_ms=0.0, **timer.timings()))
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and timer.first is None:
                        log.warning("compute replica %s unavailable, trying another", replica.address)
                        continue  # nothing streamed yet: another replica may serve it
                    status = exc.code().name
                    raise GatewayError(status if status in _PASS_THROUGH else "UNAVAILABLE",
                                       f"compute replica {replica.address}: {exc.details()}") from None
                finally:
                    replica.in_flight -= 1
                    call.cancel()
        finally:
            IN_FLIGHT.dec()
            self._calls.pop(request_id, None)
            self._aborted.discard(request_id)
            self.metrics.record_request(status or "CANCELLED", timer, queue_ms)

    def abort(self, request_id: str) -> None:
        """End a request in flight; its stream finishes with finish_reason abort."""
        call = self._calls.get(request_id)
        if call is None:
            raise GatewayError("INVALID_ARGUMENT", f"request_id {request_id!r} is not in flight")
        self._aborted.add(request_id)
        call.cancel()  # compute sees the cancel, aborts, and frees the blocks at its next step

    async def pool_stats(self, pool_id: str = "") -> list[dict]:
        """Every pool's block counts from the memory service (empty when it is not configured or
        does not answer: stats are best effort)."""
        if self._memory is None:
            return []
        try:
            reply = await self._memory.Stats(memory_pb2.StatsRequest(pool_id=pool_id), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("memory service stats unavailable: %s", exc.details())
            return []
        return [{f.name: getattr(p, f.name) for f in p.DESCRIPTOR.fields} for p in reply.pools]
