"""The scheduler's memory call over gRPC: registers this replica's pool, then one StepRequest per
engine step on a long-lived StepStream (a unary call costs about 0.4 ms more a round trip here).
send() queues the request and returns; receive() reads the answer, so the round trip runs while
the engine's forward does. Converts with memory_service.contract and records the
time each call keeps the engine thread.

The pool is held under a lease that a heartbeat thread renews (off the engine thread, so a
prefill that takes seconds never lets it lapse). Whatever breaks the link (the memory service
is down or restarted, the lease ran out while this process was paused) raises MemoryLost from
send/receive, or sets `lost` from the heartbeat; the engine loop then calls `reconnect()` and
recomputes its sequences in the new pool (compute_service.async_engine).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Iterator

import grpc

from common.grpc_auth import internal_sync_channel
from common.grpc_server import CHANNEL_OPTIONS
from memory_service.contract import (
    MemoryLost,
    StepRequest,
    StepResponse,
    step_request_to_proto,
    step_response_from_proto,
)
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger(__name__)


class MemoryClient:
    def __init__(
        self,
        address: str,
        num_blocks: int,
        block_size: int,
        replica: str,
        timeout_s: float = 30.0,
        on_lost: Callable[[], None] | None = None,
        token_file: str = "",
    ) -> None:
        self.channel = internal_sync_channel(address, token_file, CHANNEL_OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)
        self.num_blocks, self.block_size, self.replica = num_blocks, block_size, replica
        self.on_lost = on_lost  # called from the heartbeat thread (wakes the engine loop)
        self.lost = threading.Event()
        self._closed = threading.Event()
        self.pool_id, self.lease_ttl_s = "", 0.0
        self.address = ""  # advertised once the replica is SERVING (advertise): then the gateway routes to it
        self._address_lock = threading.Lock()  # a heartbeat never sends an address older than the last advertise
        self._register()
        # Per call, the time the engine thread spent in it: building and queueing the request,
        # then waiting for and converting the answer (the travel overlaps the forward in between).
        self.call_seconds: deque[float] = deque(maxlen=100_000)
        self._send_seconds = 0.0
        self._requests: queue.SimpleQueue | None = None
        self._responses: Iterator[memory_pb2.StepResponse] | None = None
        self._heartbeat = threading.Thread(target=self._heartbeat_forever, name="memory-heartbeat", daemon=True)
        self._heartbeat.start()

    def _register(self) -> None:
        reply = self.stub.RegisterPool(
            memory_pb2.RegisterPoolRequest(
                num_blocks=self.num_blocks, block_size=self.block_size, replica=self.replica, address=self.address
            ),
            timeout=5,
        )
        self.pool_id, self.lease_ttl_s = reply.pool_id, reply.lease_ttl_s

    def reconnect(self) -> None:
        """Register a new pool (raises MemoryLost while the memory service cannot be reached)."""
        self._close_stream()
        try:
            self._register()
        except grpc.RpcError as exc:
            raise MemoryLost(f"cannot register with the memory service: {exc.code().name}") from None
        self.lost.clear()
        log.info("registered again with the memory service: pool %s", self.pool_id)

    def advertise(self, address: str) -> None:
        """Tell the memory service where this replica serves (empty = withdraw: draining). Sent
        at once, then with every heartbeat, and with the registration of a new pool after the
        memory link broke (the replica is NOT_SERVING on health until that link works again, so
        the gateway routes nothing to it early). A failure here is the heartbeat's to notice."""
        with self._address_lock:
            self.address = address
            try:
                self.stub.Heartbeat(memory_pb2.HeartbeatRequest(pool_id=self.pool_id, address=address), timeout=2)
            except grpc.RpcError as exc:
                log.warning("advertising %r failed (%s); the heartbeat retries", address, exc.code().name)

    def send(self, request: StepRequest) -> None:
        """Put the step's request on the open stream (a broken stream is reopened here)."""
        start = time.perf_counter()
        if self.lost.is_set():
            raise MemoryLost("the heartbeat lost the memory service")
        if self._responses is None:
            self._requests = queue.SimpleQueue()
            self._responses = self.stub.StepStream(iter(self._requests.get, None))
        self._requests.put(step_request_to_proto(request, self.pool_id))
        self._send_seconds = time.perf_counter() - start

    def receive(self) -> StepResponse:
        """The answer to the last send; usually here already, having travelled during a forward."""
        start = time.perf_counter()
        try:
            reply = next(self._responses)
        except (grpc.RpcError, StopIteration) as exc:
            self._close_stream()
            self.lost.set()
            why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else "stream ended"
            raise MemoryLost(f"memory step failed ({why})") from None
        response = step_response_from_proto(reply)
        self.call_seconds.append(self._send_seconds + time.perf_counter() - start)
        return response

    def _heartbeat_forever(self) -> None:
        """Renew the lease every quarter of its TTL. A refused or failed heartbeat sets `lost` and
        cancels the open step stream, so an engine thread waiting on a hung memory service wakes
        up with MemoryLost instead of waiting forever."""
        while not self._closed.wait(max(self.lease_ttl_s / 4, 0.1)):
            if self.lost.is_set():
                continue  # the engine loop is registering again
            pool_id = self.pool_id
            try:
                with self._address_lock:
                    self.stub.Heartbeat(
                        memory_pb2.HeartbeatRequest(pool_id=pool_id, address=self.address),
                        timeout=max(self.lease_ttl_s / 2, 0.5),
                    )
            except grpc.RpcError as exc:
                if self._closed.is_set() or pool_id != self.pool_id:
                    continue  # closing, or the engine registered a new pool meanwhile: not about it
                log.warning("memory heartbeat for %s failed: %s %s", pool_id, exc.code().name, exc.details())
                self.lost.set()
                responses = self._responses
                if responses is not None:
                    responses.cancel()
                if self.on_lost is not None:
                    self.on_lost()

    def p50_ms(self) -> float:
        calls = sorted(self.call_seconds)
        return calls[len(calls) // 2] * 1000 if calls else 0.0

    def _close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # ends the request iterator: the stream closes cleanly
        self._requests = self._responses = None

    def close(self) -> None:
        """Release the pool (its blocks are free at once) and stop the heartbeat."""
        self._closed.set()
        self._close_stream()
        try:
            self.stub.ReleasePool(memory_pb2.ReleasePoolRequest(pool_id=self.pool_id), timeout=2)
        except grpc.RpcError:
            pass  # the memory service is gone already, or the lease ran out: nothing left to release
        self.channel.close()
