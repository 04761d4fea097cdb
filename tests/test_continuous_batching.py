"""Many requests over one shared pool: batching, preemption and abort never change anyone's tokens."""

from __future__ import annotations

import numpy as np

from bench.local_engine import LocalEngine
from common.blocks import blocks_for_tokens, blocks_to_admit
from common.sampling_params import SamplingParams
from memory_service.audit import audit
from memory_service.events import EventRecorder, read_log
from tests.conftest import hf_greedy, random_prompt


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def assert_all_blocks_free(engine: LocalEngine) -> None:
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert engine.allocator.sequence_ids() == []


def record_events(engine: LocalEngine, path) -> EventRecorder:
    recorder = EventRecorder(log_path=str(path))
    recorder.attach("local", "in-process", engine.allocator)
    return recorder


def assert_log_passes_audit(recorder: EventRecorder, engine: LocalEngine, path) -> None:
    """The run's block-event log replays without a violation (memory_service.audit)."""
    recorder.snapshot("local", "in-process", engine.allocator)
    recorder.close()
    ok, message = audit(read_log(str(path)))
    assert ok, message


def test_32_concurrent_prompts_under_preemption_match_hf_and_sequential(hf_gpt2_dir, hf_model, tmp_path):
    rng = np.random.default_rng(42)
    lengths = [1, 300] + rng.integers(1, 301, size=30).tolist()
    prompts = [random_prompt(rng, n) for n in lengths]
    params = [greedy(int(n)) for n in rng.integers(4, 33, size=32)]

    engine = LocalEngine(
        model=str(hf_gpt2_dir), block_size=16, kv_budget_tokens=1024, max_num_seqs=32, headroom_blocks_per_seq=0
    )  # pack the pool: preemption must happen
    recorder = record_events(engine, tmp_path / "events.jsonl")
    batched = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"
    assert engine.stats.peak_running > 1
    assert_all_blocks_free(engine)
    assert_log_passes_audit(recorder, engine, tmp_path / "events.jsonl")

    sequential = LocalEngine(model=str(hf_gpt2_dir), block_size=16, kv_budget_tokens=1024, max_num_seqs=1)
    for prompt, p, got in zip(prompts, params, batched, strict=False):
        assert got.token_ids == hf_greedy(hf_model, prompt, p.max_new_tokens)
        assert got.token_ids == sequential.generate([prompt], p)[0].token_ids
        assert got.finish_reason == "length"


def test_joining_aborting_and_early_finishing_leave_the_others_unchanged(hf_gpt2_dir, tmp_path):
    rng = np.random.default_rng(1)
    prompts = [random_prompt(rng, n) for n in (20, 45, 70, 33)]
    alone = [
        LocalEngine(model=str(hf_gpt2_dir), kv_budget_tokens=2048).generate([p], greedy(30))[0].token_ids
        for p in prompts
    ]

    engine = LocalEngine(model=str(hf_gpt2_dir), kv_budget_tokens=2048)
    recorder = record_events(engine, tmp_path / "events.jsonl")
    first = engine.add_request(prompts[0], greedy(30))
    doomed = engine.add_request(prompts[1], greedy(30))
    short = engine.add_request(prompts[2], greedy(5))  # finishes at a different step
    tokens: dict[str, list[int]] = {first: [], doomed: [], short: []}
    late = None
    for step in range(200):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if step == 3:
            late = engine.add_request(prompts[3], greedy(30))  # joins while the others decode
        if step == 6:
            assert engine.abort(doomed)
        if not engine.has_unfinished():
            break
    assert tokens[first] == alone[0]
    assert tokens[short] == alone[2][:5]
    assert tokens[late] == alone[3]
    assert 0 < len(tokens[doomed]) < 30
    assert not engine.abort(doomed), "a finished request cannot be aborted twice"
    assert_all_blocks_free(engine)
    assert_log_passes_audit(recorder, engine, tmp_path / "events.jsonl")


def test_sampled_tokens_do_not_depend_on_batch_company_or_preemption():
    def sampled(seed):
        return SamplingParams(max_new_tokens=40, temperature=0.9, top_k=40, top_p=0.95, seed=seed, ignore_eos=True)

    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, n) for n in (10, 150, 200, 90, 60)]
    alone = LocalEngine(model="dummy:tiny", kv_budget_tokens=2048).generate([prompts[0]], sampled(11))[0]
    crowded = LocalEngine(model="dummy:tiny", kv_budget_tokens=512, headroom_blocks_per_seq=0)
    results = crowded.generate(prompts, [sampled(11)] + [sampled(i) for i in range(4)])
    assert crowded.scheduler.num_preemptions > 0
    assert results[0].token_ids == alone.token_ids
    assert_all_blocks_free(crowded)


def test_stop_strings_and_eos_finish_one_sequence_only():
    engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=2048)
    probe = engine.generate(["Hello"], greedy(12))[0]
    stop_text = probe.text[len(probe.text) // 2 :][:3]
    assert stop_text
    results = engine.generate(
        ["Hello", "Hello"], [SamplingParams(max_new_tokens=12, temperature=0, stop=[stop_text]), greedy(12)]
    )
    assert results[0].finish_reason == "stop" and stop_text not in results[0].text
    assert results[0].text == probe.text[: probe.text.find(stop_text)]
    assert results[1].token_ids == probe.token_ids
    assert_all_blocks_free(engine)


def test_contiguous_reservation_admits_fewer_sequences_than_paging():
    """Peak concurrency follows from the budget and the request sizes, with the allocator's own
    arithmetic: paging admits as many 100-token prompts as their blocks fit (growth comes later,
    by preemption if need be), reserving prompt + max_new_tokens (Orca-Oracle) fewer, reserving
    the whole context (Orca-Max) fewest. 24 prompts, so no arm is capped by the request count.
    Packing alone is measured: the identical prompts would share blocks with prefix caching on."""
    prompts, new_tokens, budget = [[7] * 100] * 24, 20, 2048
    paged = LocalEngine(model="dummy:tiny", kv_budget_tokens=budget, headroom_blocks_per_seq=0, prefix_caching="off")
    paged.generate(prompts, greedy(new_tokens))
    watermark = paged.scheduler.config.watermark_blocks
    paged_peak = (paged.num_blocks - watermark) // blocks_for_tokens(100, paged.block_size)
    assert paged.stats.peak_running == paged_peak == 18

    peaks = {}
    for reserve in ("max-new-tokens", "max-model-len"):
        contiguous = LocalEngine(model="dummy:tiny", mode="contiguous", reserve=reserve, kv_budget_tokens=budget)
        contiguous.generate(prompts, greedy(new_tokens))
        reserved = contiguous.kv.reservation.tokens(100, new_tokens)
        per_request = blocks_to_admit(100, reserved, contiguous.block_size)
        assert contiguous.stats.peak_running == contiguous.num_blocks // per_request
        assert paged.stats.mean_utilization > contiguous.stats.mean_utilization
        peaks[reserve] = contiguous.stats.peak_running
    assert paged_peak > peaks["max-new-tokens"] == 16 > peaks["max-model-len"] == 2
    assert paged.stats.mean_utilization > 0.9
