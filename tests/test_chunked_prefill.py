"""Chunked prefill against Hugging Face GPT-2 on the same weights: a prompt split over several
steps, beside other sequences' decodes, gives the logits (1e-4) and greedy tokens of one whole
forward, for every chunk size and alignment of prompts to blocks and chunks, after prefix hits,
and under preemption and abort in the middle of a prompt; the books balance after each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from compute_service.scheduled_batch import ScheduledBatch
from tests.conftest import hf_greedy, random_prompt
from tests.test_continuous_batching import assert_all_blocks_free, assert_log_passes_audit, record_events

BLOCK = 16
CHUNK_SIZES = [1, 7, 16, 17, 64, None]  # None: the whole prompt in one step (chunking off)
PROMPT_LENS = [1, 15, 16, 17, 40, 129]  # every alignment to blocks of 16 and to the chunks above


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def chunked_engine(hf_gpt2_dir, chunk: int | None, **overrides) -> LocalEngine:
    """An engine whose step budget is `chunk` tokens (max_num_seqs must fit in it), or whole
    prompts (chunking off)."""
    settings = dict(model=str(hf_gpt2_dir), block_size=BLOCK, kv_budget_tokens=4096, headroom_blocks_per_seq=0)
    if chunk is None:
        settings.update(chunked_prefill="off")
    else:
        settings.update(max_num_batched_tokens=chunk, max_num_seqs=min(chunk, 4))
    return LocalEngine(**{**settings, **overrides})


class StepLog:
    """Every step's rows and logits, mapped back to the sequences they belong to."""

    def __init__(self, engine: LocalEngine) -> None:
        self.batches: list[ScheduledBatch] = []
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.rows: dict[str, list[tuple[int, int]]] = {}  # seq id -> (first token, tokens) per row
        prepare, execute = engine.runner.prepare, engine.runner.execute

        def recording_prepare(batch: ScheduledBatch):
            self.batches.append(batch)
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
                self.rows.setdefault(seq.request_id, []).append((seq.num_computed_tokens, n))
            return prepare(batch)

        def recording_execute(prepared):
            logits = execute(prepared)
            for seq, row in zip(self.batches[-1].sampling_seqs, logits, strict=True):
                self.logits.setdefault(seq.request_id, []).append(row.clone())
            return logits

        engine.runner.prepare, engine.runner.execute = recording_prepare, recording_execute


def hf_logits(hf_model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF's logits for every generated token's position: (len(output), vocab)."""
    with torch.no_grad():
        return hf_model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_logits_and_tokens_equal_hf_for_every_chunk_size(hf_gpt2_dir, hf_model, chunk):
    """The prompts arrive one step apart, so later ones are chunked beside earlier ones' decodes."""
    engine = chunked_engine(hf_gpt2_dir, chunk)
    log = StepLog(engine)
    prompts = [random_prompt(np.random.default_rng(n), n) for n in PROMPT_LENS]
    ids = []
    for prompt in prompts:
        ids.append(engine.add_request(prompt, greedy(12)))
        engine.step()
    results = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.sequence
    for rid, prompt in zip(ids, prompts, strict=True):
        output = results[rid].output_token_ids
        assert output == hf_greedy(hf_model, prompt, 12)
        got = torch.stack(log.logits[rid])
        assert (got - hf_logits(hf_model, prompt, output)).abs().max().item() <= 1e-4
        rows = log.rows[rid]
        assert all(n <= (chunk or len(prompt)) for _, n in rows)
        prompt_rows = [n for start, n in rows if start < len(prompt)]
        assert sum(prompt_rows) == len(prompt)  # each prompt token computed once, in order
        assert [start for start, _ in rows] == np.cumsum([0] + [n for _, n in rows[:-1]]).tolist()
        if chunk is not None and len(prompt) > chunk:
            assert len(prompt_rows) > 1, "a prompt longer than the budget was meant to be chunked"
    if chunk is not None and chunk > 1:  # chunks ran in the same steps as other sequences' decodes
        assert any(0 < b.num_decodes < len(b.seqs) for b in log.batches)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("chunk", [7, 16, 17])
def test_chunks_start_after_a_prefix_hit_and_match_hf(hf_gpt2_dir, hf_model, chunk):
    """A prompt sharing 40 tokens with a finished one hits its 2 full blocks (32 tokens) and
    chunks the rest from token 32 on; blocks committed by chunks are hit in turn."""
    engine = chunked_engine(hf_gpt2_dir, chunk)
    log = StepLog(engine)
    rng = np.random.default_rng(3)
    first = random_prompt(rng, 45)
    second = first[:40] + random_prompt(rng, 57)
    engine.generate([first], greedy(4))
    got = engine.generate([second], greedy(10))[0]
    rid = next(r for r in log.rows if r != "req-0")
    assert log.rows[rid][0][0] == 2 * BLOCK  # the first chunk starts past the hit
    assert got.token_ids == hf_greedy(hf_model, second, 10)
    logits = torch.stack(log.logits[rid])
    assert (logits - hf_logits(hf_model, second, got.token_ids)).abs().max().item() <= 1e-4
    third = engine.generate([second[:80] + [5, 6, 7]], greedy(3))[0]  # hits blocks the chunks committed
    assert third.cached_tokens == 80
    assert third.token_ids == hf_greedy(hf_model, second[:80] + [5, 6, 7], 3)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("prefix_caching", ["on", "off"])
def test_preemption_in_the_middle_of_a_prompt_changes_no_token(hf_gpt2_dir, hf_model, tmp_path, prefix_caching):
    """A pool too small for everyone: sequences are preempted while their prompt is half
    computed; recomputed (from their committed blocks, with prefix caching on), every output
    still equals HF's, nothing leaks, and the block-event log passes the audit."""
    rng = np.random.default_rng(11)
    prompts = [random_prompt(rng, int(n)) for n in rng.integers(20, 120, size=12)]
    params = [greedy(int(n)) for n in rng.integers(8, 40, size=12)]
    engine = chunked_engine(
        hf_gpt2_dir, 17, kv_budget_tokens=256, max_num_seqs=8, prefix_caching=prefix_caching
    )  # 16 blocks: preemption must happen
    recorder = record_events(engine, tmp_path / "events.jsonl")
    preempted_mid_prompt, hits_after = [], []
    preempt = engine.scheduler._preempt

    def recording_preempt(seq):
        if seq.num_computed_tokens < seq.prompt_len - 1:
            preempted_mid_prompt.append(seq)
        preempt(seq)

    engine.scheduler._preempt = recording_preempt
    prepare = engine.runner.prepare

    def recording_prepare(batch):
        hits_after.extend(s.num_hit_tokens for s in batch.seqs if s in preempted_mid_prompt and s.num_hit_tokens)
        return prepare(batch)

    engine.runner.prepare = recording_prepare
    results = engine.generate(prompts, params)
    assert preempted_mid_prompt, "a sequence was meant to be preempted in the middle of its prompt"
    if prefix_caching == "on":
        assert hits_after, "a recomputed prompt was meant to start from the blocks its chunks committed"
    for prompt, p, got in zip(prompts, params, results, strict=True):
        assert got.token_ids == hf_greedy(hf_model, prompt, p.max_new_tokens)
    assert_all_blocks_free(engine)
    assert_log_passes_audit(recorder, engine, tmp_path / "events.jsonl")


def test_abort_in_the_middle_of_a_prompt_frees_its_blocks_and_touches_no_other(hf_gpt2_dir, hf_model):
    engine = chunked_engine(hf_gpt2_dir, 7)
    rng = np.random.default_rng(5)
    other, long = random_prompt(rng, 9), random_prompt(rng, 90)
    other_id = engine.add_request(other, greedy(30))
    engine.step()
    long_id = engine.add_request(long, greedy(5))
    for _ in range(4):
        engine.step()
    seq = engine._requests[long_id]
    assert 0 < seq.num_computed_tokens < len(long) - 1, "the long prompt was meant to be half computed"
    assert engine.abort(long_id)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.sequence for o in engine.step() if o.finished})
    assert done[long_id].finish_reason.value == "abort"
    assert done[other_id].output_token_ids == hf_greedy(hf_model, other, 30)
    assert_all_blocks_free(engine)


def test_one_memory_call_per_step_with_chunks_and_decodes_mixed(hf_gpt2_dir):
    """Admissions, growth of decodes and chunk rows of one step travel in one call."""
    engine = chunked_engine(hf_gpt2_dir, 16)
    rng = np.random.default_rng(9)
    engine.generate([random_prompt(rng, int(n)) for n in (70, 5, 33, 100)], greedy(6))
    load = engine.load()
    assert load.num_memory_calls <= engine.stats.num_forwards + 2  # + the flushes of an idle engine


def test_a_long_prompt_computes_at_most_the_threshold_a_step_while_short_ones_fill_the_budget(hf_gpt2_dir, hf_model):
    """long_prefill_token_threshold caps one prompt's chunk; the budget still takes several prompts."""
    engine = chunked_engine(hf_gpt2_dir, 64, long_prefill_token_threshold=16)
    log = StepLog(engine)
    rng = np.random.default_rng(8)
    prompts = [random_prompt(rng, n) for n in (100, 12, 14, 10)]
    results = engine.generate(prompts, greedy(5))
    assert all(n <= 16 for rows in log.rows.values() for _, n in rows)
    assert any(sum(n for n in b.num_new_tokens if n > 1) > 16 for b in log.batches)  # several chunks in a step
    for prompt, got in zip(prompts, results, strict=True):
        assert got.token_ids == hf_greedy(hf_model, prompt, 5)
    assert_all_blocks_free(engine)


def test_a_prompt_that_fits_a_step_is_not_cut_to_fill_the_rest_of_another(hf_gpt2_dir, hf_model):
    """Only a step's first admission is cut to what is left (it would not fit a step of its own
    either); a later prompt that fits a step whole waits for the next one rather than start a chunk
    that finishes nothing now: a burst's short prompts get their first tokens sooner."""
    engine = chunked_engine(hf_gpt2_dir, 64)
    log = StepLog(engine)
    rng = np.random.default_rng(10)
    prompts = [random_prompt(rng, n) for n in (40, 40, 100)]
    results = engine.generate(prompts, greedy(4))
    ids = [r.request_id for r in results]
    assert log.rows[ids[0]][0] == (0, 40) and log.rows[ids[1]][0] == (0, 40), "a fitting prompt was split"
    assert [seq.request_id for seq in log.batches[0].seqs] == [ids[0]]  # 24 tokens were left: #2 waited
    long_rows = [n for start, n in log.rows[ids[2]] if start < 100]
    assert len(long_rows) > 1 and sum(long_rows) == 100  # longer than a step: chunked from what was left
    for prompt, got in zip(prompts, results, strict=True):
        assert got.token_ids == hf_greedy(hf_model, prompt, 4)
    assert_all_blocks_free(engine)
