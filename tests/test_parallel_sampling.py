"""n samples of one prompt, fanned out as n sequences: the prompt's full blocks computed once and
shared through the prefix cache, each sample computing only the block that holds the prompt's
last token; each sample reproducible from the request's seed and equal to HF where it is greedy."""

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


def record_prefills(eng: LocalEngine) -> list[int]:
    """The prompt tokens every step computes (its chunk rows; steps of decodes only are left out)."""
    prefill_tokens: list[int] = []
    execute = eng.runner.execute

    def recording(prepared):
        meta = prepared.meta
        if not meta.is_decode:
            prefill_tokens.append(sum(meta.seq_lens[meta.num_decodes :]))
        return execute(prepared)

    eng.runner.execute = recording
    return prefill_tokens


def test_greedy_samples_each_equal_hf(hf_gpt2_dir, hf_model):
    prompt = random_prompt(np.random.default_rng(1), 37)
    result = engine(hf_gpt2_dir).generate(
        [prompt], SamplingParams(max_new_tokens=10, temperature=0, n=3, ignore_eos=True)
    )[0]
    expected = hf_greedy(hf_model, prompt, 10)
    assert [s.index for s in result.samples] == [0, 1, 2]
    assert all(s.token_ids == expected for s in result.samples)


@pytest.mark.parametrize("prompt_len", [37, 32])
def test_the_prompt_is_computed_once_and_its_full_blocks_shared(hf_gpt2_dir, prompt_len):
    """4 samples: the first computes the whole prompt; the others wait for its blocks to be
    committed, then compute only the block holding the prompt's last token (an admission never
    hits that one), and every full block before it is shared."""
    prompt = random_prompt(np.random.default_rng(2), prompt_len)
    eng = engine(hf_gpt2_dir)
    prefill_tokens = record_prefills(eng)
    result = eng.generate([prompt], seeded(4))[0]
    shared_blocks = (prompt_len - 1) // BLOCK  # full blocks before the one with the last token
    last_block_tokens = prompt_len - shared_blocks * BLOCK
    assert prefill_tokens == [prompt_len, 3 * last_block_tokens]  # then the 3 others, in one step
    assert len({tuple(s.token_ids) for s in result.samples}) == 4  # they did diverge
    own = -(-(prompt_len + 11) // BLOCK) - shared_blocks  # blocks each sample holds past the shared ones
    assert eng.stats.peak_used_blocks == shared_blocks + 4 * own
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


def test_samples_lost_with_the_memory_side_mid_request_are_recomputed_to_the_same_tokens(hf_gpt2_dir):
    """The memory side is lost while sample 0 decodes and the others have just been admitted:
    every sample goes back to the queue once, and each still ends as in an uninterrupted run."""
    prompt = random_prompt(np.random.default_rng(8), 37)
    expected = [s.token_ids for s in engine(hf_gpt2_dir).generate([prompt], seeded(3))[0].samples]
    eng = engine(hf_gpt2_dir)
    request_id = eng.add_request(prompt, seeded(3))
    for _ in range(2):  # sample 0's prefill, then the others' (sample 0 decodes beside them)
        eng.step()
    sched = eng.scheduler
    assert len(sched.running) == 3
    eng.allocator = BlockAllocator(eng.allocator.num_blocks, BLOCK)  # the memory side is lost
    eng.kv.memory = LocalMemory(eng.allocator)
    assert sched.forget_memory() == 3
    assert sorted(s.index for s in sched.waiting) == [0, 1, 2] and len(sched.waiting) == 3
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
    prefill_tokens = record_prefills(eng)
    contiguous = eng.generate([prompt], seeded(3))[0].samples
    assert [s.token_ids for s in contiguous] == [s.token_ids for s in paged]
    assert eng.scheduler.num_preemptions == 0
    assert sum(prefill_tokens) == 3 * 30  # nothing shared
