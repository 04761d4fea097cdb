"""The gateway process: the public gRPC API (rpc.v1.Gateway), whose servicer translates its
messages to and from the transport-free core (gateway.core), which validates, routes, aborts and
measures; beside it, in the same event loop, the OpenAI-compatible HTTP front (gateway.openai_api).
Run it with `python -m gateway.server` (flags/env: GatewayConfig).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import grpc
from prometheus_client import start_http_server

from common.grpc_auth import refuse_open_listener
from common.grpc_server import bind, make_server, public_server_options, set_serving, until_stop_signal
from common.http_server import start_http
from common.protocol import logprobs_to_proto, sampling_params_from_proto
from common.settings import parse_config
from gateway.api_types import ClientRequest, Completion, GatewayError
from gateway.auth import ApiKeys, GrpcCallLimits
from gateway.config import GatewayConfig
from gateway.core import GatewayCore
from gateway.http_bounds import HttpBounds, bounded_protocol
from gateway.metrics import TENANT_LABELS
from gateway.openai_api import create_app
from rpc.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2

log = logging.getLogger("gateway")
SERVICE = "rpc.v1.Gateway"


def client_request(message: generate_pb2.GenerateRequest, tenant: str) -> ClientRequest:
    """The public message as the core's request (the core checks it), on behalf of `tenant`."""
    kind = message.WhichOneof("prompt")
    if kind == "token_ids":
        prompt: bytes | list[int] | None = list(message.token_ids.ids)
    elif kind == "text":
        prompt = message.text
    else:
        prompt = None
    return ClientRequest(prompt, sampling_params_from_proto(message.params), message.request_id, tenant)


async def refuse(context: grpc.aio.ServicerContext, exc: GatewayError) -> None:
    """End the call with the core's error; a limit that lifts later says when, in `retry-after`
    trailing metadata (whole seconds, as HTTP's Retry-After)."""
    if exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(math.ceil(exc.retry_after_s))),))
    await context.abort(grpc.StatusCode[exc.status], exc.message)


def complete_message(done: Completion) -> generate_pb2.Complete:
    return generate_pb2.Complete(
        request_id=done.request_id,
        finish_reason=done.finish_reason,
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        timings=generate_pb2.Timings(**done.timings),
        num_preemptions=done.num_preemptions,
        replica=done.replica,
        seed=done.seed,
        num_migrations=done.num_migrations,
        cached_tokens=done.cached_tokens,
        index=done.index,
        matched_tokens=done.matched_tokens,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore, keys: ApiKeys) -> None:
        self.core, self.keys = core, keys

    async def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant. The interceptor has already refused a call without a valid key;
        should this servicer ever run without it, such a call still fails closed here."""
        tenant = self.keys.tenant(dict(context.invocation_metadata() or ()).get("authorization"))
        if tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        return tenant

    async def Generate(self, request, context):
        try:
            async with contextlib.aclosing(
                self.core.generate(client_request(request, await self._tenant(context)), context.time_remaining())
            ) as events:
                async for event in events:
                    if isinstance(event, Completion):
                        yield generate_pb2.GenerateResponse(complete=complete_message(event))
                    else:
                        yield generate_pb2.GenerateResponse(
                            chunk=generate_pb2.Chunk(
                                token_ids=event.token_ids,
                                text=event.text,
                                index=event.index,
                                logprobs=logprobs_to_proto(event.logprobs, generate_pb2.TokenLogprobs),
                            )
                        )
        except GatewayError as exc:
            await refuse(context, exc)

    async def GenerateUnary(self, request, context):
        samples: dict[int, generate_pb2.GenerateResult] = {}
        async for response in self.Generate(request, context):
            kind = response.WhichOneof("kind")
            index = getattr(response, kind).index
            result = samples.setdefault(index, generate_pb2.GenerateResult())
            if kind == "chunk":
                result.token_ids.extend(response.chunk.token_ids)
                result.logprobs.extend(response.chunk.logprobs)
                result.text += response.chunk.text
            else:
                result.complete.CopyFrom(response.complete)
        first = samples.get(0, generate_pb2.GenerateResult())
        if len(samples) > 1:
            every = [
                generate_pb2.GenerateResult(
                    token_ids=r.token_ids, text=r.text, complete=r.complete, logprobs=r.logprobs
                )
                for r in (samples[i] for i in sorted(samples))
            ]  # copies, taken before sample 0 gets them
            first.samples.extend(every)
        return first

    async def Abort(self, request, context):
        try:
            self.core.abort(request.request_id, await self._tenant(context))
        except GatewayError as exc:
            await context.abort(grpc.StatusCode[exc.status], exc.message)
        return gateway_pb2.AbortResponse()

    async def GetModelInfo(self, request, context):
        try:
            info = self.core.model_info
        except GatewayError as exc:
            await context.abort(grpc.StatusCode[exc.status], exc.message)
        return gateway_pb2.ModelInfo(
            model=info.model,
            context_length=info.context_length,
            block_size=info.block_size,
            replicas=len(self.core.replicas.replicas),
            mode=info.mode,
            vocab_size=info.vocab_size,
        )

    async def GetStats(self, request, context):
        m = self.core.metrics
        return gateway_pb2.GatewayStats(
            requests_total=m.requests_total,
            requests_failed=m.requests_failed,
            requests_in_flight=self.core.num_in_flight,
            output_tokens_total=m.output_tokens,
            output_tokens_per_second=m.output_tokens_per_second,
            **{name: gateway_pb2.LatencySummary(**m.summary(name)) for name in ("ttft", "tpot", "itl", "e2e", "queue")},
            pools=[gateway_pb2.PoolStats(**pool) for pool in await self.core.pool_stats(request.pool_id)],
            routing=self.core.routing.policy,
            replicas=[
                gateway_pb2.ReplicaRouting(
                    address=r.address,
                    serving=r.serving,
                    in_flight=r.in_flight,
                    requests_routed=r.requests_routed,
                    prompt_tokens=r.prompt_tokens,
                    matched_tokens=r.matched_tokens,
                    cached_tokens=r.cached_tokens,
                    prefix_hit_rate=r.prefix_hit_rate,
                )
                for r in self.core.replicas.replicas
            ],
        )


async def serve(config: GatewayConfig) -> None:
    keys = ApiKeys.load(config.api_keys_file, config.api_keys)
    TENANT_LABELS.update(keys.labels)
    refuse_open_listener(
        "gateway",
        config.exposed_host or config.host,
        keys.enabled,
        config.allow_unauthenticated,
        "API keys (--api-keys-file)",
    )
    core = GatewayCore(config)
    server, health = make_server(
        [SERVICE],
        interceptors=(keys.interceptor(), GrpcCallLimits(config.max_concurrent_rpcs)),
        options=public_server_options(config.max_request_bytes, config.grpc_keepalive_s, config.grpc_min_client_ping_s),
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core, keys), server)
    port = bind(server, config.host, config.port, config.tls_cert_file, config.tls_key_file)
    await server.start()  # health answers NOT_SERVING until a replica has told us the model
    bounds = HttpBounds.from_config(config)
    app = create_app(core, keys, bounds)
    http = (
        await start_http(
            app,
            config.host,
            config.http_port,
            config.tls_cert_file,
            config.tls_key_file,
            config.drain_timeout_s,
            bounded_protocol(bounds),
            config.http_keepalive_s,
        )
        if config.http_port
        else None
    )
    # (/health answers 503 until a replica answers)
    scheme = "https" if config.tls_cert_file else "http"
    log.info(
        "gateway listening on %s:%d (gRPC%s)%s, API keys %s; waiting for compute at %s (routing %s)",
        config.host,
        port,
        ", TLS" if config.tls_cert_file else "",
        f" and {scheme}://{config.host}:{config.http_port} (OpenAI API)" if http else "",
        f"required ({len(keys.tenants)} tenant(s))" if keys.enabled else "off",
        config.compute_addresses or f"the replicas the memory service at {config.memory_address} lists",
        config.routing,
    )
    info = await core.start()
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    await set_serving(health, [SERVICE])
    log.info(
        "gateway serving %s (context %d, %s mode) via %d replica(s); metrics on :%s",
        info.model,
        info.context_length,
        info.mode,
        len(core.replicas.replicas),
        config.metrics_port or "off",
    )
    await until_stop_signal()
    # Drain: leave the load balancer's rotation, refuse new calls, let streams finish.
    await set_serving(health, [SERVICE], serving=False)
    app.state.draining = True
    log.info("stopping: %d stream(s) in flight get up to %.0f s", core.num_in_flight, config.drain_timeout_s)
    if http is not None:
        http.stop_accepting()  # open responses get up to drain_timeout_s
    await server.stop(grace=config.drain_timeout_s)
    if http is not None:
        await http.stop()
    await core.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(parse_config(GatewayConfig, argv, __doc__)))


if __name__ == "__main__":
    main()
