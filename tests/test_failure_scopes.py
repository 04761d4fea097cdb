"""The gateway acts on who a replica's failure is about (common/failures.py): a request that
failed by itself ends after one attempt and leaves its replica in rotation; a replica giving a
request back (drain) moves it without counting a death; a request whose replicas die under it
`max_replica_deaths` times is failed as a query of death instead of walking on to the next one.
The gateway core in-process against fake compute replicas (real gRPC servers on loopback)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from common.failures import FAILURE_SCOPE_KEY, REPLICA_SCOPE, REQUEST_SCOPE
from common.grpc_server import make_server, set_serving
from common.sampling_params import SamplingParams
from gateway.api_types import ClientRequest, Completion, GatewayError
from gateway.config import GatewayConfig
from gateway.core import GatewayCore
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc

SERVICE = "rpc.internal.v1.ComputeService"


class FakeReplica(compute_pb2_grpc.ComputeServiceServicer):
    """Answers Info and health like a replica; Generate streams a token, then behaves as the
    script's next mode says (the fakes share one script, in call order, whichever replica the
    router picks): "ok" completes, "request" fails the request by itself, "drain" gives it back,
    "die" breaks the call with no scope (as a replica that crashed)."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.calls = script, 0

    async def Info(self, request, context):
        return compute_pb2.InfoResponse(
            model="fake",
            context_length=1024,
            block_size=16,
            num_blocks=64,
            mode="paged",
            vocab_size=50257,
            cache_namespace="fake",
        )

    async def Generate(self, request, context):
        self.calls += 1
        mode = self.script.pop(0)
        yield compute_pb2.GenerateResponse(chunk=compute_pb2.Chunk(token_ids=[7]))
        if mode == "ok":
            yield compute_pb2.GenerateResponse(
                complete=compute_pb2.Complete(
                    finish_reason="length",
                    prompt_tokens=len(request.prompt_token_ids),
                    completion_tokens=2,
                    token_ids=[8],
                )
            )
        elif mode == "request":
            await context.abort(
                grpc.StatusCode.INTERNAL,
                "request failed: its row's logits are not finite",
                ((FAILURE_SCOPE_KEY, REQUEST_SCOPE),),
            )
        elif mode == "drain":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining", ((FAILURE_SCOPE_KEY, REPLICA_SCOPE),))
        else:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")


@contextlib.asynccontextmanager
async def gateway_over(script: list[str], replicas: int, **settings):
    fakes, servers = [FakeReplica(script) for _ in range(replicas)], []
    for fake in fakes:
        server, health = make_server([SERVICE])
        compute_pb2_grpc.add_ComputeServiceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await set_serving(health, [SERVICE])
        servers.append((server, port))
    config = GatewayConfig(
        compute_addresses=",".join(f"127.0.0.1:{p}" for _, p in servers),
        memory_address="",
        routing="round-robin",
        health_poll_s=0.1,
        **settings,
    )
    core = GatewayCore(config)
    await core.start()
    try:
        yield core, fakes
    finally:
        await core.close()
        for server, _ in servers:
            await server.stop(None)


async def run(core: GatewayCore) -> list:
    request = ClientRequest([1, 2, 3], SamplingParams(max_new_tokens=2, temperature=0))
    return [event async for event in core.generate(request)]


def test_a_request_that_failed_by_itself_is_not_retried_and_its_replica_stays():
    async def scenario():
        async with gateway_over(["request", "ok"], 2) as (core, fakes):
            with pytest.raises(GatewayError) as caught:
                await run(core)
            assert caught.value.status == "INTERNAL" and "not finite" in caught.value.message
            assert sum(f.calls for f in fakes) == 1
            assert all(r.serving for r in core.replicas.replicas)

    asyncio.run(scenario())


def test_a_query_of_death_is_failed_after_its_second_replica_death():
    async def scenario():
        async with gateway_over(["die", "die", "ok"], 3, max_replica_deaths=2) as (core, fakes):
            with pytest.raises(GatewayError) as caught:
                await run(core)
            assert caught.value.status == "INTERNAL" and "died under it 2 times" in caught.value.message
            assert sum(f.calls for f in fakes) == 2  # never sent to the third

    asyncio.run(scenario())


def test_a_replica_giving_a_request_back_is_not_a_death():
    async def scenario():
        async with gateway_over(["drain", "ok"], 2, max_replica_deaths=1) as (core, fakes):
            events = await run(core)
            assert isinstance(events[-1], Completion) and events[-1].num_migrations == 1
            assert sorted(f.calls for f in fakes) == [1, 1]

    asyncio.run(scenario())
