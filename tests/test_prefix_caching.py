"""Automatic prefix caching against Hugging Face's GPT-2 (the oracle): prompts that share prefixes
of every alignment reuse cached blocks, and the tokens are HF's and the same with caching off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from memory_service.block_allocator import BlockAllocator
from memory_service.step import LocalMemory
from tests.conftest import hf_greedy, random_prompt

GREEDY = dict(temperature=0.0, ignore_eos=True)
BLOCK = 16


def engine(hf_gpt2_dir, **overrides) -> LocalEngine:
    settings = dict(model=str(hf_gpt2_dir), block_size=BLOCK, kv_budget_tokens=4096, headroom_blocks_per_seq=0)
    return LocalEngine(**{**settings, **overrides})


def shared_prefix_prompts() -> list[list[int]]:
    """A 40-token system prompt (2 full blocks + 8), then prompts that share 5 tokens (less than a
    block), exactly 1 and 2 blocks, 2 blocks + a partial one, all of it, all of it plus more, an
    identical prompt, and a prompt that is a prefix of another (ending inside a cached block)."""
    rng = np.random.default_rng(11)
    system = random_prompt(rng, 40)
    tail = lambda n: random_prompt(rng, n)  # noqa: E731
    first = system + tail(20)
    return [
        first,
        system[:5] + tail(30),
        system[:16] + tail(9),
        system[:32] + tail(3),
        system[:37] + tail(12),
        system,
        first + tail(7),
        system + tail(1),
        system[:33],
        system[:33],
    ]


def run_each_after_the_first(eng: LocalEngine, prompts: list[list[int]], new_tokens: int):
    """The first prompt alone (it fills the cache), then the rest together."""
    params = SamplingParams(max_new_tokens=new_tokens, **GREEDY)
    return eng.generate(prompts[:1], params) + eng.generate(prompts[1:], params)


def test_shared_prefixes_of_every_alignment_give_hf_tokens_and_hit_the_cache(hf_gpt2_dir, hf_model):
    prompts = shared_prefix_prompts()
    eng = engine(hf_gpt2_dir)
    results = run_each_after_the_first(eng, prompts, 12)
    for prompt, result in zip(prompts, results, strict=False):
        assert result.token_ids == hf_greedy(hf_model, prompt, 12)
    # Whole blocks of the longest cached prefix, never the block holding the last prompt token.
    assert [r.cached_tokens for r in results] == [0, 0, 16, 32, 32, 32, 48, 32, 32, 32]
    short = eng.generate([prompts[1][:5]], SamplingParams(max_new_tokens=1, **GREEDY))[0]
    assert short.cached_tokens == 0  # shorter than a block: a query that cannot hit, counted as one
    stats = eng.allocator.stats()
    assert stats.prefix_query_tokens == sum(len(p) for p in prompts) + 5
    assert stats.prefix_hit_tokens == sum(r.cached_tokens for r in results)
    assert eng.allocator.stats().num_used_blocks == 0  # cached blocks are free (parked), none leaked
    assert eng.allocator.stats().num_cached_blocks > 0


@pytest.mark.parametrize("shared", [16, 40, 48])
def test_logits_after_a_hit_equal_hf_at_prefill_and_every_decode_step(hf_gpt2_dir, hf_model, shared):
    """Tokens alone are a weak check on a small random model (its argmax barely depends on
    attention): the logits of the suffix-only prefill and of every decode step after it must
    equal HF's over the whole sequence."""
    rng = np.random.default_rng(shared)
    first = random_prompt(rng, 50)
    prompt = first[:shared] + random_prompt(rng, 21)
    eng = engine(hf_gpt2_dir)
    eng.generate([first], SamplingParams(max_new_tokens=2, **GREEDY))
    seen: list[torch.Tensor] = []
    execute = eng.runner.execute
    eng.runner.execute = lambda prepared: seen.append(execute(prepared)) or seen[-1]
    result = eng.generate([prompt], SamplingParams(max_new_tokens=8, **GREEDY))[0]
    assert result.cached_tokens == shared // BLOCK * BLOCK > 0
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
    assert (torch.cat(seen) - expected).abs().max().item() <= 1e-4


def test_outputs_are_identical_with_caching_on_and_off_greedy_and_seeded(hf_gpt2_dir):
    prompts = shared_prefix_prompts()
    seeded = [
        SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    outputs = {}
    for caching in ("on", "off"):
        eng = engine(hf_gpt2_dir, prefix_caching=caching)
        greedy = run_each_after_the_first(eng, prompts, 10)
        sampled = eng.generate(prompts, seeded)
        outputs[caching] = [r.token_ids for r in greedy + sampled]
        hits = sum(r.cached_tokens for r in greedy + sampled)
        assert (hits > 0) == (caching == "on")
    assert outputs["on"] == outputs["off"]


def test_a_follow_up_turn_hits_the_blocks_filled_during_decode(hf_gpt2_dir, hf_model):
    """The conversation so far (prompt + answer) sent again with a new question: the blocks the
    answer filled during decode were committed too, so all of it but the last partial block hits."""
    rng = np.random.default_rng(12)
    eng = engine(hf_gpt2_dir)
    first_turn = random_prompt(rng, 30)
    answer = eng.generate([first_turn], SamplingParams(max_new_tokens=40, **GREEDY))[0].token_ids
    second_turn = first_turn + answer + random_prompt(rng, 5)
    result = eng.generate([second_turn], SamplingParams(max_new_tokens=6, **GREEDY))[0]
    assert result.cached_tokens == (30 + 40 - 1) // BLOCK * BLOCK  # the last token's k/v is never written
    assert result.token_ids == hf_greedy(hf_model, second_turn, 6)


def test_eviction_pressure_a_pool_too_small_to_keep_the_cache(hf_gpt2_dir, hf_model):
    """12 blocks: every prompt evicts what the one before cached (LRU), and tokens stay HF's."""
    rng = np.random.default_rng(3)
    system = random_prompt(rng, 48)
    prompts = [
        system + random_prompt(rng, 20),
        random_prompt(rng, 150),
        system + random_prompt(rng, 4),
        random_prompt(rng, 120),
        system + random_prompt(rng, 30),
    ]
    eng = engine(hf_gpt2_dir, kv_budget_tokens=12 * BLOCK)
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    results = [eng.generate([p], params)[0] for p in prompts]
    for prompt, result in zip(prompts, results, strict=False):
        assert result.token_ids == hf_greedy(hf_model, prompt, 8)
    assert results[2].cached_tokens == 0  # the 150-token prompt evicted the system prompt's blocks
    assert eng.allocator.stats().num_used_blocks == 0


def test_forced_preemption_with_shared_blocks_changes_no_token(hf_gpt2_dir, hf_model):
    """A pool that cannot hold every sequence's growth: sequences sharing cached blocks are
    preempted and recomputed (hitting their own committed blocks), and no block another sequence
    holds is freed or overwritten."""
    rng = np.random.default_rng(5)
    system = random_prompt(rng, 64)
    prompts = [system + random_prompt(rng, int(n)) for n in rng.integers(1, 20, size=6)]
    eng = engine(hf_gpt2_dir, kv_budget_tokens=20 * BLOCK)
    results = run_each_after_the_first(eng, prompts, 40)
    assert eng.scheduler.num_preemptions > 0
    for prompt, result in zip(prompts, results, strict=False):
        assert result.token_ids == hf_greedy(hf_model, prompt, 40)
    assert eng.allocator.stats().num_used_blocks == 0


def test_a_burst_of_shared_prefix_prompts_computes_the_prefix_once(hf_gpt2_dir):
    """All arrive at once: the first of each group is prefilled, the others are held until its
    blocks are committed, then hit them (the scheduler's hold-a-step rule)."""
    rng = np.random.default_rng(8)
    systems = [random_prompt(rng, 64) for _ in range(2)]
    prompts = [systems[i % 2] + random_prompt(rng, 10) for i in range(8)]
    eng = engine(hf_gpt2_dir)
    results = eng.generate(prompts, SamplingParams(max_new_tokens=4, **GREEDY))
    assert [r.cached_tokens for r in results] == [0, 0] + [64] * 6
    stats = eng.allocator.stats()
    assert stats.prefix_hit_tokens == 6 * 64 and stats.prefix_query_tokens == 8 * 74


def test_blocks_of_a_sequence_that_ends_before_its_forward_never_match(hf_gpt2_dir):
    """Aborted between admission and its prefill (the pipelined memory call allocated its blocks
    already): nothing it holds was written, so nothing becomes a cache hit."""
    rng = np.random.default_rng(9)
    prompt = random_prompt(rng, 64)
    eng = engine(hf_gpt2_dir)
    first = eng.add_request(prompt, SamplingParams(max_new_tokens=30, **GREEDY))
    eng.step()  # prefill of the first request; the next step's request travels during it
    second = eng.add_request(prompt + [1], SamplingParams(max_new_tokens=4, **GREEDY))
    eng.abort(first)  # ended after its prefill ran: its prompt blocks were written
    while eng.has_unfinished():
        eng.step()
    victim = eng.add_request(random_prompt(rng, 64), SamplingParams(max_new_tokens=4, **GREEDY))
    eng.scheduler.schedule()  # admitted and allocated, never run
    eng.abort(victim)
    while eng.has_unfinished():
        eng.step()
    committed = len(eng.allocator.cache.hashed_blocks())
    assert committed == 4  # the first prompt's 4 blocks (the victim committed none)
    del second


@pytest.mark.parametrize("salts", [("a", "a"), ("a", "b")])
def test_cache_salt_keeps_tenants_apart(hf_gpt2_dir, salts):
    prompt = random_prompt(np.random.default_rng(4), 50)
    eng = engine(hf_gpt2_dir)
    eng.generate([prompt], SamplingParams(max_new_tokens=2, cache_salt=salts[0], **GREEDY))
    result = eng.generate([prompt], SamplingParams(max_new_tokens=2, cache_salt=salts[1], **GREEDY))[0]
    assert result.cached_tokens == (48 if salts[0] == salts[1] else 0)


def test_a_lost_memory_side_is_rebuilt_by_the_recompute_and_hits_again(hf_gpt2_dir):
    """The memory service restarts (a new, empty allocator): the replica recomputes its sequences
    in the new pool, their blocks are committed again from the tokens it keeps, and sequences
    sharing a prefix share it again. Tokens are those of an uninterrupted run."""
    rng = np.random.default_rng(13)
    system = random_prompt(rng, 48)
    prompts = [system + random_prompt(rng, 5 + i) for i in range(3)]
    params = SamplingParams(max_new_tokens=20, **GREEDY)
    expected = [r.token_ids for r in engine(hf_gpt2_dir).generate(prompts, params)]
    eng = engine(hf_gpt2_dir)
    ids = [eng.add_request(p, params) for p in prompts]
    for _ in range(6):
        eng.step()
    eng.allocator = BlockAllocator(eng.allocator.num_blocks, BLOCK)  # the restarted memory service
    eng.kv.memory = LocalMemory(eng.allocator)
    assert eng.scheduler.forget_memory() == 3
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.sequence.output_token_ids
    assert [done[i] for i in ids] == expected
    stats = eng.allocator.stats()
    assert stats.prefix_hit_tokens == 2 * 48  # the first recomputed sequence's prefix, hit by the others
    assert stats.num_used_blocks == 0
