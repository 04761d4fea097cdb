"""n samples of one prompt: one prefill, blocks shared until the samples diverge (copy-on-write),
each sample reproducible from the request's seed and equal to HF where it is greedy."""

from __future__ import annotations

import numpy as np
import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams, sample_seed
from memory_service.block_allocator import BlockAllocator
from memory_service.step import LocalMemory
from tests.conftest import hf_greedy, random_prompt

BLOCK = 16


def engine(hf_gpt2_dir, **overrides) -> LocalEngine:
    settings = dict(model=str(hf_gpt2_dir), block_size=BLOCK, kv_budget_tokens=4096, headroom_blocks_per_seq=0)
    return LocalEngine(**{**settings, **overrides})


def seeded(n: int, seed: int = 7, max_new_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.95, seed=seed, n=n, ignore_eos=True)


def record_steps(eng: LocalEngine) -> tuple[list[tuple[int, int]], list[int]]:
    """Every copy-on-write copy the runner performs, and the token count of every prefill."""
    copies: list[tuple[int, int]] = []
    prefill_tokens: list[int] = []
    execute = eng.runner.execute

    def recording(prepared):
        copies.extend(prepared.copies)
        if prepared.meta.is_prefill:
            prefill_tokens.append(len(prepared.input_ids))
        return execute(prepared)

    eng.runner.execute = recording
    return copies, prefill_tokens


def test_greedy_samples_each_equal_hf(hf_gpt2_dir, hf_model):
    prompt = random_prompt(np.random.default_rng(1), 37)
    result = engine(hf_gpt2_dir).generate(
        [prompt], SamplingParams(max_new_tokens=10, temperature=0, n=3, ignore_eos=True)
    )[0]
    expected = hf_greedy(hf_model, prompt, 10)
    assert [s.index for s in result.samples] == [0, 1, 2]
    assert all(s.token_ids == expected for s in result.samples)


@pytest.mark.parametrize("prompt_len, expected_copies", [(37, 3), (32, 0)])
def test_one_prefill_and_exactly_the_copies_divergence_needs(hf_gpt2_dir, prompt_len, expected_copies):
    """4 samples share the prompt's blocks. A partial last block is copied once per sample but
    the last to write (n - 1 copies); a prompt that fills its blocks exactly needs none."""
    prompt = random_prompt(np.random.default_rng(2), prompt_len)
    eng = engine(hf_gpt2_dir)
    copies, prefill_tokens = record_steps(eng)
    result = eng.generate([prompt], seeded(4))[0]
    assert prefill_tokens == [prompt_len]  # the prompt was computed once for the 4 samples
    assert len(copies) == expected_copies
    assert len({tuple(s.token_ids) for s in result.samples}) == 4  # they did diverge
    prompt_blocks = -(-prompt_len // BLOCK)
    growth = -(-(prompt_len + 11) // BLOCK) - prompt_len // BLOCK  # blocks each sample adds past the shared ones
    assert eng.stats.peak_used_blocks <= prompt_len // BLOCK + 4 * growth
    assert eng.stats.peak_used_blocks < 4 * prompt_blocks
    assert eng.allocator.stats().num_used_blocks == 0


def test_sample_i_equals_a_request_with_its_derived_seed_whatever_the_batch(hf_gpt2_dir):
    rng = np.random.default_rng(3)
    prompt = random_prompt(rng, 40)
    alone = engine(hf_gpt2_dir).generate([prompt], seeded(4))[0].samples
    company = [random_prompt(rng, int(n)) for n in (5, 60, 23)]
    eng = engine(hf_gpt2_dir)
    mixed = eng.generate(company + [prompt] + company, [seeded(2, seed=1)] * 3 + [seeded(4)] + [seeded(1)] * 3)
    assert [s.token_ids for s in mixed[3].samples] == [s.token_ids for s in alone]
    for i, sample in enumerate(alone):
        single = SamplingParams(**{**seeded(1).__dict__, "seed": sample_seed(7, i)})
        assert engine(hf_gpt2_dir).generate([prompt], single)[0].token_ids == sample.token_ids


def test_no_cache_mode_samples_the_same_tokens(hf_gpt2_dir):
    prompt = random_prompt(np.random.default_rng(4), 21)
    paged = engine(hf_gpt2_dir).generate([prompt], seeded(3))[0].samples
    no_cache = engine(hf_gpt2_dir, mode="no-cache").generate([prompt], seeded(3))[0].samples
    assert [s.token_ids for s in paged] == [s.token_ids for s in no_cache]


def test_preempting_samples_does_not_corrupt_the_blocks_the_others_share(hf_gpt2_dir):
    """A pool too small for 4 samples x 3 requests to grow: samples are preempted and recomputed
    while their siblings keep decoding over the shared prompt blocks; every token is as without
    pressure."""
    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, int(n)) for n in (50, 45, 70)]
    params = [seeded(4, seed=s, max_new_tokens=40) for s in (1, 2, 3)]
    roomy = engine(hf_gpt2_dir).generate(prompts, params)
    tight = engine(hf_gpt2_dir, kv_budget_tokens=26 * BLOCK)
    squeezed = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    for a, b in zip(roomy, squeezed, strict=False):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert tight.allocator.stats().num_used_blocks == 0


def test_abort_ends_every_sample_and_frees_every_block(hf_gpt2_dir):
    eng = engine(hf_gpt2_dir)
    request_id = eng.add_request(random_prompt(np.random.default_rng(6), 30), seeded(4, max_new_tokens=50))
    for _ in range(3):
        eng.step()
    assert eng.abort(request_id)
    finished = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finished[out.index] = out.finish_reason
    assert finished == {i: "abort" for i in range(4)}
    assert eng.allocator.stats().num_used_blocks == 0 and eng.allocator.stats().num_sequences == 0


def test_n_is_validated(hf_gpt2_dir):
    eng = engine(hf_gpt2_dir, max_num_seqs=4)
    for n, message in [(0, "n must be"), (17, "n must be"), (5, "max_num_seqs")]:
        with pytest.raises(ValueError, match=message):
            eng.add_request([1, 2, 3], SamplingParams(n=n))


def test_a_sample_preempted_before_its_first_token_then_the_memory_side_lost_is_forked_again(hf_gpt2_dir):
    """Forked, preempted before its first token was drawn, and the pool lost before the prefill
    ran: the sample goes back to waiting on its parent (not into the queue as well), and every
    sample still ends as in an uninterrupted run."""
    prompt = random_prompt(np.random.default_rng(8), 37)
    expected = [s.token_ids for s in engine(hf_gpt2_dir).generate([prompt], seeded(3))[0].samples]
    eng = engine(hf_gpt2_dir)
    request_id = eng.add_request(prompt, seeded(3))
    sched = eng.scheduler
    assert sched.schedule() is not None  # sample 0 admitted, samples 1 and 2 forked off it
    child = next(s for s in sched.running if s.index == 2)
    sched._preempt(child)  # as a plan made during the prefill would
    eng.allocator = BlockAllocator(eng.allocator.num_blocks, BLOCK)  # ...and the memory side is lost
    eng.kv.memory = LocalMemory(eng.allocator)
    sched.forget_memory()
    assert child not in sched.waiting and child.status.value == "waiting"
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.index] = out.sequence.output_token_ids
    assert [done[i] for i in range(3)] == expected
    assert eng.allocator.stats().num_used_blocks == 0
    assert not eng.is_active(request_id)


def test_sample_ids_never_collide_with_another_request(hf_gpt2_dir):
    eng = engine(hf_gpt2_dir)
    eng.add_request([1, 2, 3], seeded(2), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2, 3], seeded(1), request_id="x#1")
    eng.add_request([1, 2, 3], seeded(1), request_id="y#1")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2, 3], seeded(2), request_id="y")


def test_contiguous_mode_runs_samples_on_their_own_reservations(hf_gpt2_dir):
    prompt = random_prompt(np.random.default_rng(9), 30)
    paged = engine(hf_gpt2_dir).generate([prompt], seeded(3))[0].samples
    eng = engine(hf_gpt2_dir, mode="contiguous", reserve="max-new-tokens")
    copies, prefill_tokens = record_steps(eng)
    contiguous = eng.generate([prompt], seeded(3))[0].samples
    assert [s.token_ids for s in contiguous] == [s.token_ids for s in paged]
    assert eng.scheduler.num_preemptions == 0
    assert copies == [] and sum(prefill_tokens) == 3 * 30  # nothing shared, nothing copied
