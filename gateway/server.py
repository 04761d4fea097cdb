"""The public gRPC API: validates, routes to a compute replica, streams tokens back, measures.

The servicer translates protobuf <-> forwarded calls; routing is gateway.router, numbers are
gateway.metrics. Run it with `python -m gateway.server` (flags/env: GatewayConfig).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import grpc
from prometheus_client import start_http_server

from common import protocol
from common.grpc_server import CHANNEL_OPTIONS, bind, make_server, set_serving
from common.settings import parse_config
from compute_service.sampling_params import validate_prompt
from compute_service.tokenizer import get_tokenizer
from gateway.metrics import IN_FLIGHT, GatewayMetrics, RequestTimer
from gateway.router import ReplicaRouter
from rpc.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2, memory_pb2, memory_pb2_grpc

log = logging.getLogger("gateway")
SERVICE = "rpc.v1.Gateway"
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50050
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off
    compute_addresses: str = "127.0.0.1:50052"  # comma-separated, or dns:///name:port
    memory_address: str = "127.0.0.1:50051"  # for GetStats; empty = none
    max_in_flight: int = 512  # more concurrent requests get RESOURCE_EXHAUSTED
    startup_timeout_s: float = 600.0


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, router: ReplicaRouter, model_info) -> None:
        self.config = config
        self.router = router
        self.model_info = model_info
        self.tokenizer = get_tokenizer()
        self.metrics = GatewayMetrics()
        self._calls: dict[str, grpc.aio.UnaryStreamCall] = {}
        self._aborted: set[str] = set()
        self._memory = None
        if config.memory_address:
            channel = grpc.aio.insecure_channel(config.memory_address, options=CHANNEL_OPTIONS)
            self._memory = memory_pb2_grpc.MemoryServiceStub(channel)

    async def _require_model_info(self, context) -> None:
        if self.model_info is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no compute replica has answered yet")

    def _validate(self, request) -> generate_pb2.GenerateRequest:
        """The request to forward (token ids, explicit params, an id), or ValueError naming a field."""
        prompt = protocol.prompt_token_ids(request, self.tokenizer)
        params = protocol.sampling_params(request.params)
        validate_prompt(prompt, params, self.model_info.context_length, self.model_info.vocab_size)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._calls:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        return generate_pb2.GenerateRequest(request_id=request_id, token_ids=generate_pb2.TokenIds(ids=prompt),
                                            params=protocol.params_to_proto(params))

    async def Generate(self, request, context):
        await self._require_model_info(context)
        timer = RequestTimer()
        try:
            forward = self._validate(request)
        except ValueError as exc:
            self.metrics.record_request("INVALID_ARGUMENT", timer, None)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if len(self._calls) >= self.config.max_in_flight:
            self.metrics.record_request("RESOURCE_EXHAUSTED", timer, None)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "gateway is at max_in_flight; retry later")
        status, queue_ms, tried = "OK", None, set()
        IN_FLIGHT.inc()
        try:
            while True:
                replica = self.router.pick(exclude=tried)
                if replica is None:
                    status = "UNAVAILABLE"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "no compute replica is reachable")
                tried.add(replica.address)
                call = replica.stub.Generate(forward, timeout=context.time_remaining())
                self._calls[forward.request_id] = call
                replica.in_flight += 1
                try:
                    async for response in call:
                        if response.HasField("chunk") and response.chunk.token_ids:
                            timer.on_tokens(len(response.chunk.token_ids))
                            self.metrics.record_tokens(len(response.chunk.token_ids))
                        if response.HasField("complete"):
                            queue_ms = response.complete.timings.queue_ms
                            response.complete.timings.MergeFrom(generate_pb2.Timings(**timer.timings()))
                        yield response
                    return
                except asyncio.CancelledError:
                    if forward.request_id not in self._aborted:
                        status = "CANCELLED"
                        raise  # the client went away; `finally` cancels the upstream call
                    yield self._aborted_message(forward, timer)
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and timer.first is None:
                        log.warning("compute replica %s unavailable, trying another", replica.address)
                        continue  # nothing streamed yet: another replica may serve it
                    status = exc.code().name
                    code = exc.code() if exc.code() in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, f"compute replica {replica.address}: {exc.details()}")
                finally:
                    replica.in_flight -= 1
                    call.cancel()
        finally:
            IN_FLIGHT.dec()
            self._calls.pop(forward.request_id, None)
            self._aborted.discard(forward.request_id)
            self.metrics.record_request(status, timer, queue_ms)

    def _aborted_message(self, forward, timer: RequestTimer) -> generate_pb2.GenerateResponse:
        return generate_pb2.GenerateResponse(complete=generate_pb2.Complete(
            request_id=forward.request_id, finish_reason="abort", prompt_tokens=len(forward.token_ids.ids),
            completion_tokens=timer.num_tokens, timings=generate_pb2.Timings(**timer.timings()),
        ))

    async def GenerateUnary(self, request, context):
        token_ids, text, complete = [], [], None
        async for response in self.Generate(request, context):
            if response.HasField("chunk"):
                token_ids.extend(response.chunk.token_ids)
                text.append(response.chunk.text)
            elif response.HasField("complete"):
                complete = response.complete
        return generate_pb2.GenerateResult(token_ids=token_ids, text="".join(text), complete=complete)

    async def Abort(self, request, context):
        call = self._calls.get(request.request_id)
        if call is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id {request.request_id!r} is not in flight")
        self._aborted.add(request.request_id)
        call.cancel()  # compute sees the cancel, aborts, and frees the blocks at its next step
        return gateway_pb2.AbortResponse()

    async def GetModelInfo(self, request, context):
        await self._require_model_info(context)
        info = self.model_info
        return gateway_pb2.ModelInfo(model=info.model, context_length=info.context_length, block_size=info.block_size,
                                     replicas=len(self.router.replicas), mode=info.mode)

    async def GetStats(self, request, context):
        m = self.metrics
        stats = gateway_pb2.GatewayStats(
            requests_total=m.requests_total, requests_failed=m.requests_failed, requests_in_flight=len(self._calls),
            output_tokens_total=m.output_tokens, output_tokens_per_second=m.output_tokens_per_second,
            **{name: gateway_pb2.LatencySummary(**m.summary(name)) for name in ("ttft", "tpot", "itl", "e2e", "queue")},
        )
        if self._memory is not None:
            try:
                reply = await self._memory.Stats(memory_pb2.StatsRequest(pool_id=request.pool_id), timeout=5)
                stats.pools.extend(reply.pools)
            except grpc.aio.AioRpcError as exc:
                log.warning("memory service stats unavailable: %s", exc.details())
        return stats


async def serve(config: GatewayConfig) -> None:
    router = ReplicaRouter(config.compute_addresses)
    server, health = make_server([SERVICE])
    servicer = GatewayServicer(config, router, model_info=None)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = bind(server, config.host, config.port)
    await server.start()  # health answers NOT_SERVING until a replica has told us the model
    log.info("gateway listening on %s:%d, waiting for compute at %s", config.host, port, config.compute_addresses)
    info = servicer.model_info = await router.info(config.startup_timeout_s)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    await set_serving(health, [SERVICE])
    log.info("gateway serving %s (context %d, %s mode) via %d replica(s); metrics on :%s", info.model,
             info.context_length, info.mode, len(router.replicas), config.metrics_port or "off")
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(parse_config(GatewayConfig, argv, __doc__)))


if __name__ == "__main__":
    main()
