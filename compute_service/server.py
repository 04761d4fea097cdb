"""A compute replica over gRPC: NanoGPT + the KV pool + the scheduler, block tables kept by the
memory service. The servicer only translates the internal protobuf <-> engine calls.
Run it with `python -m compute_service.server` (flags/env: ComputeServiceConfig + EngineConfig).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time

import grpc

from common.failures import FAILURE_SCOPE_KEY, REPLICA_SCOPE
from common.grpc_auth import internal_interceptors, refuse_open_listener
from common.grpc_server import bind, make_server, set_serving, until_stop_signal
from common.protocol import logprobs_to_proto, sampling_params_from_proto
from common.settings import add_arguments, from_namespace
from common.structured_output import compile_off_loop
from compute_service.async_engine import AsyncEngine, EngineFailure
from compute_service.config import ComputeServiceConfig, EngineConfig
from compute_service.engine import InferenceEngine
from compute_service.memory_client import MemoryClient
from compute_service.outputs import RequestOutput
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc

log = logging.getLogger("compute_service")
SERVICE = "rpc.internal.v1.ComputeService"


def complete_message(out: RequestOutput, replica: str) -> compute_pb2.Complete:
    seq = out.sequence
    return compute_pb2.Complete(
        finish_reason=out.finish_reason,
        prompt_tokens=seq.prompt_len,
        completion_tokens=len(seq.output_token_ids),
        num_preemptions=seq.num_preemptions,
        replica=replica,
        token_ids=out.new_token_ids,
        output_text=seq.output_text,
        queue_ms=((seq.first_scheduled_time or seq.finish_time) - seq.arrival_time) * 1000,
        cached_tokens=seq.cached_prompt_tokens,
        index=seq.index,
        logprobs=logprobs_to_proto(out.logprobs, compute_pb2.TokenLogprobs),
    )


class ComputeServicer(compute_pb2_grpc.ComputeServiceServicer):
    def __init__(self, engine: AsyncEngine, config: ComputeServiceConfig, memory: MemoryClient | None) -> None:
        self.engine = engine
        self.config = config
        self.memory = memory
        self.draining = False

    async def Generate(self, request, context):
        engine = self.engine.engine
        if self.draining or not self.engine.memory_ok:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "compute replica is not serving: "
                + ("draining" if self.draining else "its memory service is unreachable"),
                ((FAILURE_SCOPE_KEY, REPLICA_SCOPE),),
            )
        prompt, params = list(request.prompt_token_ids), sampling_params_from_proto(request.params)
        outputs_before = list(request.output_token_ids)
        sample_outputs = {s.index: list(s.output_token_ids) for s in request.samples} or None
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must be set")
        if self.engine.num_pending >= self.config.max_waiting + engine.config.max_num_seqs:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "compute replica queue is full; retry later")
        try:
            # A grammar compiles off the event loop (bounded: its size is checked first, its work by fuel limits).
            grammars, limits = None, self.config.grammar_limits
            if params.structured_output is not None:
                grammars = await compile_off_loop(
                    lambda: engine.compile_grammar(params, outputs_before, sample_outputs, limits), limits
                )
            outputs = self.engine.submit(
                request.request_id, prompt, params, outputs_before, sample_outputs, grammars
            )  # validates, once
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except KeyError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request.request_id!r} is already running")
        finished, remaining = False, len(sample_outputs or ()) or params.n  # the call ends when every sample has
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, EngineFailure):
                    finished = True
                    scope = ((FAILURE_SCOPE_KEY, out.scope),) if out.scope else ()
                    await context.abort(grpc.StatusCode[out.status], out.message, scope)
                if out.finished:
                    remaining -= 1
                    finished = remaining == 0
                    yield compute_pb2.GenerateResponse(complete=complete_message(out, self.config.replica))
                elif out.new_token_ids:
                    yield compute_pb2.GenerateResponse(
                        chunk=compute_pb2.Chunk(
                            token_ids=out.new_token_ids,
                            index=out.index,
                            logprobs=logprobs_to_proto(out.logprobs, compute_pb2.TokenLogprobs),
                        )
                    )
        finally:
            if not finished:  # the caller cancelled or its deadline passed: free the blocks
                self.engine.abort(request.request_id)

    async def Info(self, request, context):
        engine = self.engine.engine
        load = engine.load()
        return compute_pb2.InfoResponse(
            model=engine.config.model,
            context_length=engine.max_model_len,
            block_size=engine.block_size,
            num_blocks=engine.num_blocks,
            mode=engine.config.mode,
            replica=self.config.replica,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_preemptions=load.num_preemptions,
            vocab_size=engine.model.config.vocab_size,
            num_schedule_rounds=load.num_schedule_rounds,
            num_memory_calls=load.num_memory_calls,
            memory_rpc_p50_ms=self.memory.p50_ms() if self.memory is not None else 0.0,
            cache_namespace=engine.config.cache_namespace,
            caches_prefixes=engine.config.caches_prefixes,
        )


def advertised_address(config: ComputeServiceConfig, port: int) -> str:
    """The address the gateway should dial: the setting, else host:port, else (host 0.0.0.0) the
    local IP that routes to the memory service: an address on the network both share."""
    if config.advertise_address:
        return config.advertise_address
    host = config.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
        memory_host, _, memory_port = config.memory_address.rpartition(":")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # connect() sends nothing
                probe.connect((memory_host.strip("[]"), int(memory_port or 0)))
                host = probe.getsockname()[0]
        except (OSError, ValueError):
            log.warning(
                "cannot find the interface towards %r; advertising %s (set advertise_address)",
                config.memory_address,
                host,
            )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_engine(
    engine_config: EngineConfig, config: ComputeServiceConfig
) -> tuple[InferenceEngine, MemoryClient | None]:
    """The engine with its block tables in the memory service (the no-cache baseline has none)."""
    if engine_config.mode == "no-cache":
        return InferenceEngine(engine_config), None
    if not config.memory_address:
        raise ValueError("memory_address is empty: a compute replica keeps its block tables in the memory service")
    clients: list[MemoryClient] = []

    def connect(num_blocks: int, block_size: int) -> MemoryClient:
        clients.append(
            MemoryClient(
                config.memory_address, num_blocks, block_size, config.replica, token_file=config.internal_token_file
            )
        )
        return clients[-1]

    return InferenceEngine(engine_config, connect_memory=connect), clients[0]


async def serve(engine_config: EngineConfig, config: ComputeServiceConfig) -> None:
    config.replica = config.replica or f"{socket.gethostname()}:{config.port}"
    refuse_open_listener(
        "compute", config.host, bool(config.internal_token_file), config.allow_unauthenticated, "--internal-token-file"
    )
    started = time.perf_counter()
    engine, memory = build_engine(engine_config, config)
    log.info(
        "loaded %s (%s, %s) in %.1fs: %s mode, %d blocks x %d tokens, memory at %s",
        engine_config.model,
        engine_config.device,
        engine_config.dtype,
        time.perf_counter() - started,
        engine_config.mode,
        engine.num_blocks,
        engine.block_size,
        f"{config.memory_address} ({memory.pool_id})" if memory else "none (no-cache mode)",
    )
    loop = asyncio.get_running_loop()
    server, health = make_server([SERVICE], interceptors=internal_interceptors(config.internal_token_file))

    def on_serving_change(serving: bool) -> None:  # from the engine thread: the memory link
        asyncio.run_coroutine_threadsafe(set_serving(health, [SERVICE], serving and not servicer.draining), loop)

    async_engine = AsyncEngine(engine, config.max_waiting, memory, on_serving_change)
    servicer = ComputeServicer(async_engine, config, memory)
    async_engine.start()
    compute_pb2_grpc.add_ComputeServiceServicer_to_server(servicer, server)
    port = bind(server, config.host, config.port)
    await server.start()
    await set_serving(health, [SERVICE])
    address = advertised_address(config, port)
    if memory is not None:  # only now SERVING: the gateway may route here from this moment
        await asyncio.to_thread(memory.advertise, address)
    elif config.memory_address:
        log.warning(
            "%s mode keeps no pool in the memory service, so gateways cannot discover this replica: "
            "list it in their compute_addresses",
            engine_config.mode,
        )
    log.info("compute replica %s listening on %s:%d, advertised as %s", config.replica, config.host, port, address)
    try:
        await until_stop_signal()
        await drain(servicer, health, config.drain_timeout_s)
        await server.stop(grace=1.0)
    finally:
        async_engine.stop()
        if memory is not None:
            memory.close()  # the pool's blocks are free at once, not when the lease runs out
    log.info("compute replica %s stopped", config.replica)


async def drain(servicer: ComputeServicer, health, timeout_s: float) -> None:
    """Leave the rotation (NOT_SERVING, new requests UNAVAILABLE), let in-flight requests finish
    for up to `timeout_s`, then end the rest with UNAVAILABLE: the gateway continues them on
    another replica from the tokens already streamed."""
    servicer.draining = True
    await set_serving(health, [SERVICE], serving=False)
    if servicer.memory is not None:  # leave discovery too: no gateway learns of it from now on
        await asyncio.to_thread(servicer.memory.advertise, "")
    engine = servicer.engine
    log.info("draining: %d request(s) in flight, up to %.0f s", engine.num_pending, timeout_s)
    deadline = time.monotonic() + timeout_s
    while engine.num_pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine.num_pending:
        log.warning("drain timeout: handing %d request(s) back to the gateway", engine.num_pending)
        engine.give_up_all("compute replica is draining; continue elsewhere")
        await asyncio.sleep(0.2)  # let the streams end before the server stops


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, ComputeServiceConfig)
    add_arguments(parser, EngineConfig)
    ns = parser.parse_args(argv)
    asyncio.run(serve(from_namespace(EngineConfig, ns), from_namespace(ComputeServiceConfig, ns)))


if __name__ == "__main__":
    main()
