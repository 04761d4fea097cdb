"""The gateway's transport-free core: validation, routing with retry, the abort registry and the
metrics of every request, whatever front (gRPC today) a client came through.

A front turns its own request into a `ClientRequest`, iterates `generate()` for `TokenChunk`s and
one final `Completion`, and maps a `GatewayError`'s status (a gRPC status name) onto its own
protocol. The core talks to compute replicas over the internal API (rpc.internal.v1) and turns
their token ids into text, so a request continued on another replica streams on seamlessly.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import AsyncIterator

import grpc

from common.block_hash import tenant_cache_salt
from common.failures import REPLICA_SCOPE, REQUEST_SCOPE, failure_scope
from common.grpc_auth import internal_channel
from common.grpc_server import CHANNEL_OPTIONS
from common.protocol import logprobs_from_proto
from common.sampling_params import FieldError, check_prompt_text, new_seed, validate_request
from common.structured_output import compile_off_loop, get_grammar_compiler
from common.text_stream import IncrementalText
from common.tokenizer import get_tokenizer
from gateway.api_types import ClientRequest, Completion, GatewayError, ModelInfo, TokenChunk
from gateway.config import GatewayConfig
from gateway.metrics import IN_FLIGHT, MIGRATIONS, TENANT_TOKENS, GatewayMetrics, RequestTimer, tenant_label
from gateway.replica_set import Replica, ReplicaSet
from gateway.routing import PrefixKey, Route, Routing
from gateway.tenant_limits import TenantLease, TenantLimits
from gateway.tracked_request import SampleProgress, TrackedRequest
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger("gateway")
# Replica statuses that are about the request itself: the client sees them as they are. Any other
# failure is the replica's, and the request continues on another one.
_CLIENT_ERRORS = {"INVALID_ARGUMENT", "ALREADY_EXISTS", "DEADLINE_EXCEEDED"}
MAX_REQUEST_ID_CHARS = 256
_TOKENIZE_INLINE_CHARS = 4096  # shorter texts tokenize in ~50 us: cheaper than a hop to a thread


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


class GatewayCore:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._memory, self._memory_channel = None, None
        if config.memory_address:
            self._memory_channel = internal_channel(config.memory_address, config.internal_token_file, CHANNEL_OPTIONS)
            self._memory = memory_pb2_grpc.MemoryServiceStub(self._memory_channel)
        self.replicas = ReplicaSet(
            config.compute_addresses,
            self._memory,
            config.health_poll_s,
            config.replica_down_after_s,
            config.discovery_poll_s,
            config.internal_token_file,
        )
        self.routing = Routing(
            config.routing, self.replicas, self._memory, config.kv_overlap_weight, config.match_timeout_s
        )
        self.tokenizer = get_tokenizer()
        self.metrics = GatewayMetrics()
        self.tenant_limits = TenantLimits(config.tenant_max_in_flight, config.tenant_tokens_per_minute)
        self._model_info: ModelInfo | None = None
        # By (tenant, request_id): a request id is unique within its tenant, and invisible to others.
        self._requests: set[tuple[str, str]] = set()  # accepted and not finished (running or waiting for a replica)
        self._calls: dict[tuple[str, str], tuple[grpc.aio.UnaryStreamCall, Replica]] = {}  # the attempt running now
        self._aborted: set[tuple[str, str]] = set()  # by the client's Abort
        self._evicted: set[tuple[str, str]] = set()  # attempt cancelled by the gateway: its replica is down

    async def start(self) -> ModelInfo:
        """Watch the replicas (discover them, poll their health), then wait for one to tell the
        model's facts (requests fail UNAVAILABLE until then)."""
        self.replicas.start(self._replica_down)
        info = await self.replicas.info(self.config.startup_timeout_s)
        self._model_info = ModelInfo(info.model, info.context_length, info.block_size, info.mode, info.vocab_size)
        self.routing.configure(info.block_size, info.cache_namespace, info.caches_prefixes)
        return self._model_info

    @property
    def model_info(self) -> ModelInfo:
        if self._model_info is None:
            raise GatewayError("UNAVAILABLE", "gateway is starting: no compute replica has answered yet")
        return self._model_info

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    async def tokenize(self, text: str | bytes, field_name: str = "prompt") -> list[int]:
        """A prompt's token ids, after the size bound (FieldError naming `field_name` for a text
        the context cannot hold, or bytes that are not UTF-8). A long text is tokenized on a
        worker thread (tiktoken releases the GIL): never on the event loop every stream shares."""
        check_prompt_text(text, self.model_info.context_length, self.tokenizer.max_token_bytes, field_name)
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FieldError(
                    field_name, f"{field_name}.text is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from None
        if len(text) <= _TOKENIZE_INLINE_CHARS:
            return self.tokenizer.encode(text)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def _track(self, request: ClientRequest) -> TrackedRequest:
        """The request as the gateway follows it, after the one validation this process applies
        (ValueError names the field at fault). A request without a seed gets one here."""
        info = self.model_info
        prompt = request.prompt
        if prompt is None:
            raise FieldError("prompt", "prompt must be set: give prompt text or prompt token_ids")
        prompt = await self.tokenize(prompt) if isinstance(prompt, (str, bytes)) else list(prompt)
        validate_request(prompt, request.params, info.context_length, info.vocab_size)
        if request.params.structured_output is not None:  # a bad grammar is refused before any work is queued
            limits = self.config.grammar_limits
            compiler = get_grammar_compiler(info.vocab_size, limits)
            await compile_off_loop(lambda: compiler.matcher(request.params.structured_output), limits)
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:  # it is kept, logged and sent on: bounded like cache_salt
            raise FieldError("request_id", f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters")
        if (request.tenant, request_id) in self._requests:
            raise FieldError("request_id", f"request_id {request_id!r} is already in flight")
        params = request.params if request.params.seed is not None else replace(request.params, seed=new_seed())
        # The tenant's prefix-cache namespace, from here on for routing, the replicas and the memory service.
        params = replace(params, cache_salt=tenant_cache_salt(request.tenant, params.cache_salt))
        samples = [SampleProgress(IncrementalText(self.tokenizer, params.stop)) for _ in range(params.n)]
        return TrackedRequest(request_id, prompt, params, samples, request.tenant)

    async def generate(
        self, request: ClientRequest, timeout_s: float | None = None
    ) -> AsyncIterator[TokenChunk | Completion]:
        """Stream one request: TokenChunks, then one Completion (with n > 1: every sample's
        chunks, by index, and one Completion per sample as it ends). If the replica serving it fails
        (its stream breaks, it stops answering health checks, it gives the request up while
        draining), the request continues on another replica from the tokens already streamed,
        and the client's stream goes on with the same tokens a fault-free run gives. Raises
        GatewayError; a front that stops iterating must close the generator (aclosing) so the
        replica's call is cancelled and its blocks freed.

        The attempt loop: route, run one attempt (_attempt), and on its outcome (_after_failure)
        continue elsewhere or end the request. Around it, the tenant's limits: a slot before any
        work, its token budget once the prompt's length is known, both given back at the end."""
        timer = RequestTimer()
        self._refuse_if_full(timer, request.tenant)  # before any work on the request
        try:
            lease = self.tenant_limits.admit(request.tenant)
        except GatewayError:
            self.metrics.record_request("RESOURCE_EXHAUSTED", timer, None, request.tenant)
            raise
        usage = [0, 0]  # prompt and completion tokens, once known
        try:
            async with aclosing(self._generate(request, timer, lease, usage, timeout_s)) as events:
                async for event in events:
                    yield event
        finally:
            self.tenant_limits.release(lease, sum(usage))
            TENANT_TOKENS.labels(tenant_label(request.tenant), "prompt").inc(usage[0])
            TENANT_TOKENS.labels(tenant_label(request.tenant), "completion").inc(usage[1])

    async def _generate(
        self, request: ClientRequest, timer: RequestTimer, lease: TenantLease, usage: list[int], timeout_s: float | None
    ) -> AsyncIterator[TokenChunk | Completion]:
        """generate() within the tenant's slot; fills `usage` with the tokens the request used."""
        tenant = request.tenant
        try:
            tracked = await self._track(request)
        except ValueError as exc:
            self.metrics.record_request("INVALID_ARGUMENT", timer, None, tenant)
            raise GatewayError("INVALID_ARGUMENT", str(exc), getattr(exc, "field", "")) from None
        self._refuse_if_full(timer, tenant)  # again: others arrived while it was tokenized
        try:  # the worst case: every sample runs to max_tokens (the unused part is refunded)
            self.tenant_limits.charge(lease, len(tracked.prompt) + tracked.params.n * tracked.params.max_new_tokens)
        except GatewayError:
            self.metrics.record_request("RESOURCE_EXHAUSTED", timer, None, tenant)
            raise
        if self.config.max_request_s > 0:  # no request outlives the bound, whatever its client asked
            timeout_s = self.config.max_request_s if timeout_s is None else min(timeout_s, self.config.max_request_s)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        scoped_id, status = tracked.key, None
        failed: set[str] = set()  # replicas that failed this request: another is preferred
        full: set[str] = set()  # replicas that answered RESOURCE_EXHAUSTED
        key = self.routing.key(tracked.prompt, tracked.params.cache_salt)
        self._requests.add(scoped_id)
        IN_FLIGHT.inc()
        try:
            while True:
                self._evicted.discard(scoped_id)
                route = await self._wait_for_replica(scoped_id, key, failed, full, deadline)
                if route is None:  # aborted while it waited for a replica
                    status = "OK"
                    for completion in self._aborted_completions(tracked, timer, ""):
                        yield completion
                    return
                replica = route.replica
                try:
                    async with aclosing(self._attempt(tracked, route, timer, deadline)) as events:
                        async for event in events:
                            yield event
                    if all(s.done for s in tracked.samples):
                        status = "OK"
                        return  # done: whatever happens to the call from here on is not the client's
                    failed.add(replica.address)  # the stream ended with no result: the replica's fault
                    self._migrate(tracked, replica, "the stream ended without a result", died=True)
                except asyncio.CancelledError:
                    if scoped_id in self._aborted:
                        status = "OK"
                        for completion in self._aborted_completions(tracked, timer, replica.address):
                            yield completion
                        return
                    if scoped_id in self._evicted:  # the replica is down: continue elsewhere
                        failed.add(replica.address)
                        self.replicas.suspect(replica)
                        self._migrate(tracked, replica, "its replica stopped answering", died=True)
                        continue
                    status = "CANCELLED"
                    raise  # the client went away; the attempt's call was cancelled on the way out
                except grpc.aio.AioRpcError as exc:
                    self._after_failure(tracked, replica, exc, failed, full)
                finally:
                    route.release()
        except GatewayError as exc:
            status = status or exc.status
            raise
        except Exception:
            status = status or "INTERNAL"
            raise
        finally:
            IN_FLIGHT.dec()
            self._requests.discard(scoped_id)
            self._aborted.discard(scoped_id)
            self._evicted.discard(scoped_id)
            usage[:] = [len(tracked.prompt), tracked.num_generated]
            self.metrics.record_request(status or "CANCELLED", timer, tracked.queue_ms, tenant)

    async def _attempt(
        self, tracked: TrackedRequest, route: Route, timer: RequestTimer, deadline: float | None
    ) -> AsyncIterator[TokenChunk | Completion]:
        """One attempt on `route`'s replica: its responses as the client's events, until every
        sample is done or the call ends (an error is raised to the attempt loop). The call is
        cancelled on the way out, whatever ends the attempt."""
        replica, first_complete, call = route.replica, True, None
        try:
            call = replica.stub.Generate(tracked.forward(), timeout=_remaining(deadline))
            self._calls[tracked.key] = (call, replica)
            async for response in call:
                route.prefilled()
                if response.HasField("chunk"):
                    ids, index = list(response.chunk.token_ids), response.chunk.index
                    self._count(ids, tracked.samples[index], timer)
                    text = tracked.samples[index].text.add(ids)
                    yield TokenChunk(ids, text, index, logprobs_from_proto(response.chunk.logprobs))
                elif response.HasField("complete"):
                    done = response.complete
                    sample = tracked.samples[done.index]
                    ids = list(done.token_ids)
                    self._count(ids, sample, timer)
                    rest = sample.text.finish(done.output_text)
                    if ids or rest:
                        yield TokenChunk(ids, rest, done.index, logprobs_from_proto(done.logprobs))
                    sample.done, tracked.queue_ms = True, done.queue_ms
                    if first_complete:  # an attempt's samples share one prompt: count it once
                        first_complete = False
                        route.count_prompt(done.prompt_tokens, done.cached_tokens)
                    yield Completion(
                        tracked.request_id,
                        done.finish_reason,
                        done.prompt_tokens,
                        done.completion_tokens,
                        done.num_preemptions,
                        done.replica,
                        tracked.params.seed,
                        tracked.migrations,
                        dict(queue_ms=done.queue_ms, **timer.timings()),
                        done.cached_tokens,
                        done.index,
                        route.matched_tokens,
                    )
                    if all(s.done for s in tracked.samples):
                        return
        finally:
            if call is not None:
                call.cancel()
            self._calls.pop(tracked.key, None)

    def _after_failure(
        self, tracked: TrackedRequest, replica: Replica, exc: grpc.aio.AioRpcError, failed: set[str], full: set[str]
    ) -> None:
        """An attempt's call failed: raise GatewayError to end the request, or return to continue
        it on another replica (a full replica is only avoided; a failed one is also suspected)."""
        code, scope = exc.code().name, failure_scope(exc.trailing_metadata())
        if code in _CLIENT_ERRORS or scope == REQUEST_SCOPE:  # about the request: not retried
            log.info("request %s: replica %s answered %s: %s", tracked.request_id, replica.address, code, exc.details())
            raise GatewayError(code, exc.details()) from None  # the replica's own words for the client
        if code == "RESOURCE_EXHAUSTED":
            full.add(replica.address)  # try one with room; at once RESOURCE_EXHAUSTED if none
            return
        failed.add(replica.address)
        self.replicas.suspect(replica)  # broken, or not serving (draining, no memory): none until SERVING
        # A replica giving the request back (REPLICA_SCOPE) did not die under it; transport
        # details (addresses) stay in the log.
        self._migrate(tracked, replica, f"{code}: {exc.details()}", died=scope != REPLICA_SCOPE, client_why=code)

    def _refuse_if_full(self, timer: RequestTimer, tenant: str) -> None:
        if len(self._requests) >= self.config.max_in_flight:
            self.metrics.record_request("RESOURCE_EXHAUSTED", timer, None, tenant)
            raise GatewayError("RESOURCE_EXHAUSTED", "gateway is at max_in_flight; retry later")

    def _aborted_completions(self, stream: TrackedRequest, timer: RequestTimer, replica: str) -> list[Completion]:
        """An aborted request ends every sample still running with finish_reason abort."""
        return [
            Completion(
                stream.request_id,
                "abort",
                len(stream.prompt),
                len(s.generated),
                0,
                replica,
                stream.params.seed,
                stream.migrations,
                dict(queue_ms=0.0, **timer.timings()),
                index=i,
            )
            for i, s in enumerate(stream.samples)
            if not s.done
        ]

    def _count(self, ids: list[int], sample: SampleProgress, timer: RequestTimer) -> None:
        if ids:
            sample.generated.extend(ids)
            timer.on_tokens(len(ids))
            self.metrics.record_tokens(len(ids))

    def _migrate(
        self, stream: TrackedRequest, replica: Replica, why: str, died: bool = False, client_why: str | None = None
    ) -> None:
        """Count one more continuation of `stream`, or give up past the budget (UNAVAILABLE). A
        request whose replica died under it (`died`) max_replica_deaths times is a query of
        death: failed (INTERNAL), so that it cannot take down one replica after another. `why`
        goes to the log; the client is told `client_why` (default `why`)."""
        stream.replica_deaths += died
        client_why = why if client_why is None else client_why
        if stream.replica_deaths >= self.config.max_replica_deaths:
            log.error(
                "request %s: its replica died under it %d times (last %s: %s); failing it as a query of death",
                stream.request_id,
                stream.replica_deaths,
                replica.address,
                why,
            )
            raise GatewayError(
                "INTERNAL",
                f"request failed: the replicas running it died under it "
                f"{stream.replica_deaths} times (last: {client_why}); it is not retried",
            )
        if stream.migrations >= self.config.max_migrations:
            log.warning(
                "request %s: failed on %d replicas; last %s: %s",
                stream.request_id,
                stream.migrations + 1,
                replica.address,
                why,
            )
            raise GatewayError("UNAVAILABLE", f"request failed on {stream.migrations + 1} replicas; last: {client_why}")
        stream.migrations += 1
        MIGRATIONS.inc()
        log.warning(
            "request %s: replica %s failed (%s); continuing elsewhere after %d tokens",
            stream.request_id,
            replica.address,
            why,
            stream.num_generated,
        )

    async def _wait_for_replica(
        self, scoped_id: tuple[str, str], key: PrefixKey, failed: set[str], full: set[str], deadline: float | None
    ) -> Route | None:
        """The route of the next attempt, chosen by the routing policy: to a replica that has not
        failed this request if there is one, never to one that said it is full. With none SERVING
        (all restarting, or their memory service is down) wait up to replica_wait_s (and the
        client's deadline). None if the request is aborted meanwhile."""
        give_up = time.monotonic() + self.config.replica_wait_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        while scoped_id not in self._aborted:
            route = await self.routing.choose(key, failed | full) or await self.routing.choose(key, full)
            if route is not None:
                if scoped_id in self._aborted:  # aborted while routing asked the memory service
                    route.release()
                    return None
                return route
            serving = [r for r in self.replicas.replicas if r.serving]
            if full and serving and all(r.address in full for r in serving):
                raise GatewayError("RESOURCE_EXHAUSTED", "every compute replica's queue is full; retry later")
            if time.monotonic() >= give_up:
                raise GatewayError("UNAVAILABLE", "no compute replica is serving")
            await asyncio.sleep(0.05)
        return None

    def _replica_down(self, replica: Replica) -> None:
        """The replica set lost a replica: cancel its calls, which continue elsewhere."""
        for scoped_id, (call, at) in list(self._calls.items()):
            if at is replica:
                self._evicted.add(scoped_id)
                call.cancel()

    def abort(self, request_id: str, tenant: str = "") -> None:
        """End `tenant`'s request in flight; its stream finishes with finish_reason abort. Another
        tenant's request with this id is not seen: the same answer as for no request at all."""
        key = (tenant, request_id)
        if key not in self._requests:
            raise GatewayError("INVALID_ARGUMENT", f"request_id {request_id!r} is not in flight")
        self._aborted.add(key)
        if key in self._calls:  # else it is waiting for a replica, and stops waiting
            # compute sees the cancel, aborts, and frees the blocks at its next step
            self._calls[key][0].cancel()

    async def close(self) -> None:
        await self.replicas.close()
        if self._memory_channel is not None:
            await self._memory_channel.close()

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
