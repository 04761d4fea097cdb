"""The scheduler's memory call over gRPC: registers this replica's pool, then one unary Step per
engine step. Converts protobuf <-> memory_service.step objects and records each call's latency."""
from __future__ import annotations

import time
from collections import deque

import grpc

from common.grpc_server import CHANNEL_OPTIONS
from memory_service.block_allocator import AllocatorStats
from memory_service.step import StepRequest, StepResponse
from rpc.v1 import memory_pb2, memory_pb2_grpc


class MemoryClient:
    def __init__(self, address: str, num_blocks: int, block_size: int, replica: str, timeout_s: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        self.stub = memory_pb2_grpc.MemoryServiceStub(self.channel)
        self.pool_id = self.stub.RegisterPool(
            memory_pb2.RegisterPoolRequest(num_blocks=num_blocks, block_size=block_size, replica=replica)
        ).pool_id
        self.call_seconds: deque[float] = deque(maxlen=100_000)  # recent Step round trips

    def step(self, request: StepRequest) -> StepResponse:
        message = memory_pb2.StepRequest(
            pool_id=self.pool_id,
            free=[str(s) for s in request.free],
            allocate=[memory_pb2.Allocation(seq_id=str(a.seq_id), num_tokens=a.num_tokens,
                                            reserve_tokens=a.reserve_tokens) for a in request.allocate],
            append=[memory_pb2.Append(seq_id=str(s), num_new_tokens=n) for s, n in request.append],
        )
        start = time.perf_counter()
        reply = self.stub.Step(message, timeout=30)
        self.call_seconds.append(time.perf_counter() - start)
        st = reply.stats
        return StepResponse(
            block_tables={t.seq_id: list(t.block_ids) for t in reply.block_tables},
            copies=[(c.src, c.dst) for c in reply.copies],
            rejected=list(reply.rejected),
            stats=AllocatorStats(st.num_blocks, st.block_size, st.num_free_blocks, st.num_used_blocks,
                                 st.num_tokens_stored, st.num_sequences),
        )

    def p50_ms(self) -> float:
        calls = sorted(self.call_seconds)
        return calls[len(calls) // 2] * 1000 if calls else 0.0

    def close(self) -> None:
        try:
            self.stub.ReleasePool(memory_pb2.ReleasePoolRequest(pool_id=self.pool_id), timeout=2)
        except grpc.RpcError:
            pass  # the memory service is gone already; nothing left to release
        self.channel.close()
