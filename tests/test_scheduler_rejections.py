"""The path where the memory side says no to what the scheduler planned. The scheduler's count
of free blocks is an estimate; the memory answer is the truth. A rejected admission goes back to
the front of the queue, a rejected append preempts its sequence, and neither changes a token."""

from __future__ import annotations

import numpy as np

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from compute_service.engine import InferenceEngine
from memory_service.block_allocator import BlockAllocator
from memory_service.contract import StepRequest, StepResponse
from memory_service.step import LocalMemory, apply_step
from tests.conftest import random_prompt


class RejectingMemory(LocalMemory):
    """The in-process memory side, except that every odd call refuses its first allocation and
    every third call its first append (as the memory service does when it finds no space: nothing
    changes for them, and they are listed as rejected)."""

    def __init__(self, allocator: BlockAllocator) -> None:
        super().__init__(allocator)
        self.calls = 0
        self.rejected: dict[str, int] = {"allocate": 0, "append": 0}

    def send(self, request: StepRequest) -> None:
        self.calls += 1
        refused = []
        if self.calls % 2 == 1 and request.allocate:
            refused.append(request.allocate[0].seq_id)
            request = StepRequest(request.free, request.allocate[1:], request.append)
            self.rejected["allocate"] += 1
        if self.calls % 3 == 0 and request.append:
            refused.append(request.append[0][0])
            request = StepRequest(request.free, request.allocate, request.append[1:])
            self.rejected["append"] += 1
        response = apply_step(self.allocator, request)
        self._response = StepResponse(response.block_tables, response.rejected + refused, response.stats)


def test_rejected_admissions_and_appends_are_requeued_or_preempted_and_tokens_do_not_change():
    rng = np.random.default_rng(7)
    prompts = [random_prompt(rng, int(n)) for n in rng.integers(5, 60, size=10)]
    params = [SamplingParams(max_new_tokens=int(n), temperature=0, ignore_eos=True) for n in rng.integers(5, 25, 10)]
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, seed=3, ignore_eos=True)
    prompts.append(prompts[0])
    params.append(sampled)

    expected = LocalEngine(model="dummy:tiny", kv_budget_tokens=2048).generate(prompts, params)

    fakes: list[RejectingMemory] = []
    engine = InferenceEngine(
        model="dummy:tiny",
        kv_budget_tokens=2048,
        connect_memory=lambda n, bs: fakes.append(RejectingMemory(BlockAllocator(n, bs))) or fakes[0],
    )
    results = engine.generate(prompts, params)
    memory = fakes[0]
    assert memory.rejected["allocate"] > 0 and memory.rejected["append"] > 0, memory.rejected
    assert engine.scheduler.num_preemptions >= memory.rejected["append"]  # each refused append preempted
    for got, want in zip(results, expected, strict=False):
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason
    assert memory.allocator.num_free_blocks == memory.allocator.num_blocks
    assert memory.allocator.sequence_ids() == []
