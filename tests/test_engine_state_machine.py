"""Hypothesis drives add/step/abort against a live engine with a tiny pool (so it preempts),
prompts that share prefixes (prefix-cache hits) and requests of n samples (sharing their prompt),
with a step budget that chunks prompts (ChunkedEngineMachine) and one that runs them whole, and
checks after every step that the books balance and no block leaks."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from bench.local_engine import LocalEngine
from common.blocks import blocks_for_tokens
from common.sampling_params import SamplingParams
from compute_service.sequence import SequenceStatus


class EngineMachine(RuleBasedStateMachine):
    budget: dict = {"chunked_prefill": "off"}  # prompts run whole

    def __init__(self) -> None:
        super().__init__()
        self.engine = LocalEngine(
            model="dummy:tiny",
            block_size=4,
            kv_budget_tokens=96,
            max_num_seqs=6,
            headroom_blocks_per_seq=0,
            **self.budget,
        )
        self.submitted: list[str] = []
        self.finished: dict[str, str] = {}
        self.expected_len: dict[str, int] = {}

    @rule(
        prompt_len=st.integers(1, 40),
        max_new=st.integers(1, 30),
        n=st.sampled_from([1, 1, 2, 3]),
        tail=st.integers(0, 2),
    )
    def add(self, prompt_len, max_new, n, tail):
        prompt = [3] * prompt_len + [tail] * (prompt_len % 3)  # shared prefixes of every length
        params = SamplingParams(
            max_new_tokens=max_new, temperature=0.8 if n > 1 else 0, seed=prompt_len, n=n, ignore_eos=True
        )
        rid = self.engine.add_request(prompt, params)
        self.submitted.append(rid)
        self.expected_len[rid] = max_new

    @rule(times=st.integers(1, 8))
    def step(self, times):
        for _ in range(times):
            for out in self.engine.step():
                if out.finished:
                    assert out.request_id not in self.finished, "finished twice"
                    self.finished[out.request_id] = out.finish_reason
                    if out.finish_reason == "length":
                        assert len(out.sequence.output_token_ids) == self.expected_len[out.group_id]

    @rule(data=st.data())
    def abort(self, data):
        if self.submitted:
            rid = data.draw(st.sampled_from(self.submitted))
            self.engine.abort(rid)

    @invariant()
    def books_balance(self):
        alloc, sched = self.engine.allocator, self.engine.scheduler
        holders = Counter(b for s in alloc.sequence_ids() for b in alloc.block_table(s))
        assert alloc.num_free_blocks + len(holders) == alloc.num_blocks
        assert all(alloc.ref_count(b) == n for b, n in holders.items())
        in_flight = self.engine.kv.in_flight_ids()  # asked for the next step, answer not read yet
        for seq in sched.running:
            assert seq.status is SequenceStatus.RUNNING
            table = alloc.block_table(seq.request_id)
            # Memory holds the slots the sequence counts (its whole prompt from admission on, then
            # one per decode, the one the next forward writes included) and the blocks they take.
            assert alloc.num_tokens(seq.request_id) == seq.num_slots
            assert len(table) == blocks_for_tokens(seq.num_slots, alloc.block_size)
            assert seq.num_computed_tokens <= seq.num_slots <= seq.num_tokens
            if seq.num_computed_tokens < seq.num_tokens - 1:  # a prompt part-computed: its chunks
                assert self.budget.get("chunked_prefill") != "off" or seq.num_computed_tokens == 0
                assert seq.num_slots == seq.num_tokens
            if seq.request_id in in_flight and not seq.block_table:
                # admitted (or readmitted after preemption) in that request: the table is news
                assert seq.num_computed_tokens == 0 and seq.num_slots == seq.num_tokens
            elif seq.request_id in in_flight:  # growing: at most one block opened for its next slot
                assert table[: len(seq.block_table)] == seq.block_table
                assert len(table) - len(seq.block_table) <= 1
            else:
                assert table == seq.block_table
        for seq in sched.waiting:
            assert seq.status is SequenceStatus.WAITING and not seq.block_table

    def teardown(self):
        while self.engine.has_unfinished():
            for out in self.engine.step():
                self.finished[out.request_id] = out.finish_reason
        assert {rid.split("#")[0] for rid in self.finished} == set(self.submitted), "a request was lost"
        assert self.engine.allocator.num_free_blocks == self.engine.allocator.num_blocks


class ChunkedEngineMachine(EngineMachine):
    budget = {"max_num_batched_tokens": 7}  # prompts of up to 40 tokens run in chunks beside decodes


EngineMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
ChunkedEngineMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
TestEngineMachine = EngineMachine.TestCase
TestChunkedEngineMachine = ChunkedEngineMachine.TestCase
