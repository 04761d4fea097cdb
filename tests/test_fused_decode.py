"""The fused decode step (csrc/decode_step.cpp: embeddings, every layer, ln_f and lm_head in one
C++ call) computes what the model's Python path computes, in every weight format and batch size
it takes, writes the same K/V into the pool and nothing else, gives a sequence the same bits
whatever else is in its batch, and is what the model runs for such steps.

Not bit for bit: its layer norm and GELU (csrc/row_ops.cpp) sum and round differently from
ATen's. The tolerance is what float32 rounding explains: the two paths differ by ~1e-6 of the
logits' scale where a real mistake (a missing bias, a wrong residual, a stale K/V) moves them by
~1e-1 or more."""

from __future__ import annotations

import pytest
import torch

from compute_service.kv_cache import KVCache
from compute_service.linear import SKINNY_MAX_ROWS
from compute_service.model import AttentionMetadata
from compute_service.weights import load_model
from tests.test_native_kernels import built

RELATIVE_TOLERANCE = 2e-5  # of the largest |logit| or |k/v| of the step


def decode_step(batch: int, kv: KVCache, vocab: int, gen: torch.Generator):
    """A decode step of `batch` sequences with random contexts of 1-90 tokens in random blocks;
    the first two (with more than a block each) share their first block, as a cached prefix."""
    lens = torch.randint(1, 90, (batch,), generator=gen, dtype=torch.int32)
    lens[:2] = torch.randint(kv.block_size + 1, 90, (min(batch, 2),), generator=gen, dtype=torch.int32)
    max_blocks = int((lens.max() + kv.block_size - 1) // kv.block_size)
    tables = torch.randperm(kv.num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    tables[1:2, 0] = tables[0, 0]
    positions = (lens - 1).long()
    slots = tables[torch.arange(batch), positions // kv.block_size].long() * kv.block_size + positions % kv.block_size
    meta = AttentionMetadata(
        seq_lens=[1] * batch, num_decodes=batch, slot_mapping=slots, block_tables=tables, context_lens=lens
    )
    return torch.randint(0, vocab, (batch,), generator=gen), positions, meta


def model_and_pool(weight_format: str, fc_scale: float = 1.0):
    model = load_model("dummy:gpt2")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the dummy's biases are 0 and its norms 1: make them count
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for block in model.transformer.h:  # fc_scale 300: pre-GELU activations of +-hundreds (the clamps)
            block.mlp.c_fc.weight.mul_(fc_scale)
    model.set_weight_format(weight_format)
    cfg = model.config
    kv = KVCache(cfg.n_layer, cfg.n_head, cfg.head_dim, num_blocks=512, block_size=16)
    kv.pool.copy_(torch.randn(kv.pool.shape, generator=torch.Generator().manual_seed(1)))  # earlier tokens' k/v
    return model, kv


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= RELATIVE_TOLERANCE * scale, f"{what}: max diff {diff:.3g} against a scale of {scale:.3g}"


@pytest.mark.parametrize(
    "weight_format,fc_scale", [("float32", 1.0), ("bfloat16", 1.0), ("int8", 1.0), ("float32", 300.0)]
)
def test_the_fused_decode_computes_what_the_python_path_computes(weight_format, fc_scale):
    built()
    model, kv = model_and_pool(weight_format, fc_scale)
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 3, SKINNY_MAX_ROWS):
        ids, positions, meta = decode_step(batch, kv, model.config.vocab_size, gen)
        before = kv.pool.clone()
        with torch.no_grad():
            looped = model(ids, positions, meta, kv, fused_decode=False)
            pool_looped = kv.pool.clone()
            kv.pool.copy_(before)
            assert model._fused_decode_runs(ids, meta, kv), "the fused path should run for this step"
            fused = model(ids, positions, meta, kv)
        assert fused.shape == looped.shape == (batch, model.config.vocab_size)
        assert_close(fused, looped, f"batch {batch} logits")
        assert torch.equal(fused.argmax(-1), looped.argmax(-1)), f"batch {batch}: another greedy token"
        written = (kv.pool != before).any(dim=(0, 1, 3, 5))  # (num_blocks, block_size): slots that changed
        slots = meta.slot_mapping
        assert set(written.flatten().nonzero().flatten().tolist()) <= set(slots.tolist()), "wrote outside the new slots"
        blocks, offsets = slots // kv.block_size, slots % kv.block_size
        assert_close(kv.pool[:, :, blocks, :, offsets], pool_looped[:, :, blocks, :, offsets], f"batch {batch} new k/v")


def test_a_sequences_logits_do_not_depend_on_its_batch():
    """Bit for bit the same logits alone as among 2 or 32 sequences: the engine's batches change
    every step, and greedy and seeded outputs are promised identical."""
    built()
    model, kv = model_and_pool("float32")
    ids, positions, meta = decode_step(SKINNY_MAX_ROWS, kv, model.config.vocab_size, torch.Generator().manual_seed(2))
    before = kv.pool.clone()

    def run(rows: list[int]) -> torch.Tensor:
        kv.pool.copy_(before)
        sub = AttentionMetadata(
            seq_lens=[1] * len(rows),
            num_decodes=len(rows),
            slot_mapping=meta.slot_mapping[rows],
            block_tables=meta.block_tables[rows],
            context_lens=meta.context_lens[rows],
        )
        with torch.no_grad():
            return model(ids[rows], positions[rows], sub, kv)

    together = run(list(range(SKINNY_MAX_ROWS)))
    pair = run([5, 9])
    for i in (0, 5, 9, SKINNY_MAX_ROWS - 1):
        assert torch.equal(run([i])[0], together[i]), f"sequence {i}: alone differs from in 32"
    assert torch.equal(pair[0], together[5]) and torch.equal(pair[1], together[9]), "in a pair differs from in 32"


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_any_thread_count_gives_the_same_bits(threads):
    """The split of rows, heads and sequences between threads changes who computes an element,
    never how: the same logits with 1, 3 or 8 threads as with 2 (8 threads and one sequence split
    12 heads into groups of 2: a split that left empty groups crashed the process)."""
    ext = built()
    model, kv = model_and_pool("float32")
    before = kv.pool.clone()
    steps = [
        decode_step(batch, kv, model.config.vocab_size, torch.Generator().manual_seed(batch)) for batch in (1, 2, 5)
    ]
    q = torch.randn(1, model.config.n_head, model.config.head_dim)
    k_cache, v_cache = kv.layer(0)
    _, _, attention_meta = steps[0]
    default = torch.get_num_threads()

    def run():
        out = []
        for ids, positions, meta in steps:
            kv.pool.copy_(before)
            with torch.no_grad():
                out.append(model(ids, positions, meta, kv))
        out.append(
            ext.paged_attention_decode(
                q, k_cache, v_cache, attention_meta.block_tables, attention_meta.context_lens, 0.125
            )
        )
        return out

    torch.set_num_threads(2)
    try:
        reference = run()
        torch.set_num_threads(threads)
        for i, (got, want) in enumerate(zip(run(), reference, strict=False)):
            assert torch.equal(got, want), f"{threads} threads, case {i}: max diff {(got - want).abs().max().item()}"
    finally:
        torch.set_num_threads(default)


def test_bad_steps_are_refused_before_anything_runs():
    ext = built()
    model, kv = model_and_pool("float32")
    ids, positions, meta = decode_step(2, kv, model.config.vocab_size, torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids, positions, meta, kv)  # builds the parameter list
    params, cfg = model._decode_params, model.config
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    before = kv.pool.clone()

    def call(
        ids=ids,
        positions=positions,
        slots=meta.slot_mapping,
        lens=meta.context_lens,
        params=params,
        tables=meta.block_tables,
        n_head=cfg.n_head,
    ):
        return ext.decode_step(
            ids, positions, wte, wpe, params, kv.pool, slots, tables, lens, n_head, cfg.layer_norm_epsilon, 0.125
        )

    bad_table = meta.block_tables.clone()
    bad_table[1, 0] = kv.num_blocks

    cases = {
        "token id": dict(ids=torch.tensor([0, cfg.vocab_size])),
        "position": dict(positions=torch.tensor([0, cfg.context_length])),
        "slot": dict(slots=torch.tensor([0, kv.num_blocks * kv.block_size])),
        "context length": dict(lens=torch.tensor([0, 1], dtype=torch.int32)),
        "block": dict(tables=bad_table),
        "one slot for two sequences": dict(slots=meta.slot_mapping[[0, 0]]),
        "heads": dict(n_head=0),
        "parameters": dict(params=params[:-1]),
    }
    for what, bad in cases.items():
        with pytest.raises(RuntimeError):
            call(**bad)
        assert torch.equal(kv.pool, before), f"a refused step ({what}) wrote into the pool"
    empty = torch.empty(0, dtype=torch.int64)
    none = ext.decode_step(
        empty,
        empty,
        wte,
        wpe,
        params,
        kv.pool,
        empty,
        meta.block_tables[:0],
        meta.context_lens[:0],
        cfg.n_head,
        cfg.layer_norm_epsilon,
        0.125,
    )
    assert none.shape == (0, cfg.vocab_size)
