"""The scheduler's memory call over gRPC: registers this replica's pool, then one StepRequest per
engine step on a long-lived StepStream (a unary Step costs about 0.4 ms more a round trip here).
send() queues the request and returns; receive() reads the answer, so the round trip runs while
the engine's forward does. Converts protobuf <-> memory_service.step objects and records the
time each call keeps the engine thread."""
from __future__ import annotations

import queue
import time
from collections import deque
from typing import Iterator

import grpc

from common.grpc_server import CHANNEL_OPTIONS
from memory_service.block_allocator import AllocatorStats
from memory_service.step import StepRequest, StepResponse
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc


class MemoryClient:
    def __init__(self, address: str, num_blocks: int, block_size: int, replica: str, timeout_s: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)
        self.pool_id = self.stub.RegisterPool(
            memory_pb2.RegisterPoolRequest(num_blocks=num_blocks, block_size=block_size, replica=replica)
        ).pool_id
        # Per call, the time the engine thread spent in it: building and queueing the request,
        # then waiting for and converting the answer (the travel overlaps the forward in between).
        self.call_seconds: deque[float] = deque(maxlen=100_000)
        self._send_seconds = 0.0
        self._requests: queue.SimpleQueue | None = None
        self._responses: Iterator[memory_pb2.StepResponse] | None = None

    def send(self, request: StepRequest) -> None:
        """Put the step's request on the open stream (a broken stream is reopened here)."""
        start = time.perf_counter()
        if self._responses is None:
            self._requests = queue.SimpleQueue()
            self._responses = self.stub.StepStream(iter(self._requests.get, None))
        self._requests.put(memory_pb2.StepRequest(
            pool_id=self.pool_id,
            free=[str(s) for s in request.free],
            allocate=[memory_pb2.Allocation(seq_id=str(a.seq_id), num_tokens=a.num_tokens,
                                            reserve_tokens=a.reserve_tokens) for a in request.allocate],
            append=[memory_pb2.Append(seq_id=str(s), num_new_tokens=n) for s, n in request.append],
        ))
        self._send_seconds = time.perf_counter() - start

    def receive(self) -> StepResponse:
        """The answer to the last send; usually here already, having travelled during a forward."""
        start = time.perf_counter()
        try:
            reply = next(self._responses)
        except (grpc.RpcError, StopIteration):
            self._close_stream()
            raise
        st = reply.stats
        response = StepResponse(
            block_tables={t.seq_id: list(t.block_ids) for t in reply.block_tables},
            copies=[(c.src, c.dst) for c in reply.copies],
            rejected=list(reply.rejected),
            stats=AllocatorStats(st.num_blocks, st.block_size, st.num_free_blocks, st.num_used_blocks,
                                 st.num_tokens_stored, st.num_sequences),
        )
        self.call_seconds.append(self._send_seconds + time.perf_counter() - start)
        return response

    def p50_ms(self) -> float:
        calls = sorted(self.call_seconds)
        return calls[len(calls) // 2] * 1000 if calls else 0.0

    def _close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # ends the request iterator: the stream closes cleanly
        self._requests = self._responses = None

    def close(self) -> None:
        self._close_stream()
        try:
            self.stub.ReleasePool(memory_pb2.ReleasePoolRequest(pool_id=self.pool_id), timeout=2)
        except grpc.RpcError:
            pass  # the memory service is gone already; nothing left to release
        self.channel.close()
