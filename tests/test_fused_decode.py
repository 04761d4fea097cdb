"""The fused decode step (csrc/decode_layers.cpp: every layer in one C++ call) gives the same
bits as the model's layer loop it replaces, in every weight format and batch size it takes,
and writes the same K/V into the pool; it is what the model runs for such steps."""
from __future__ import annotations

import pytest
import torch

from compute_service.kv_cache import KVCache
from compute_service.linear import SKINNY_MAX_ROWS
from compute_service.model import AttentionMetadata
from compute_service.weights import load_model
from tests.test_native_kernels import built


def decode_step(batch: int, kv: KVCache, vocab: int, gen: torch.Generator):
    """A decode step of `batch` sequences with random contexts of 1-90 tokens in random blocks."""
    lens = torch.randint(1, 90, (batch,), generator=gen, dtype=torch.int32)
    max_blocks = int((lens.max() + kv.block_size - 1) // kv.block_size)
    tables = torch.randperm(kv.num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    positions = (lens - 1).long()
    slots = tables[torch.arange(batch), positions // kv.block_size].long() * kv.block_size + positions % kv.block_size
    meta = AttentionMetadata(is_prefill=False, seq_lens=[1] * batch, slot_mapping=slots, block_tables=tables,
                             context_lens=lens)
    return torch.randint(0, vocab, (batch,), generator=gen), positions, meta


@pytest.mark.parametrize("weight_format", ["float32", "bfloat16", "int8"])
def test_the_fused_decode_equals_the_layer_loop_bit_for_bit(weight_format):
    built()
    model = load_model("dummy:gpt2")
    model.set_weight_format(weight_format)
    cfg = model.config
    kv = KVCache(cfg.n_layer, cfg.n_head, cfg.head_dim, num_blocks=512, block_size=16)
    gen = torch.Generator().manual_seed(0)
    kv.pool.copy_(torch.randn(kv.pool.shape, generator=gen))  # earlier tokens' k/v
    for batch in (1, 3, SKINNY_MAX_ROWS):
        ids, positions, meta = decode_step(batch, kv, cfg.vocab_size, gen)
        before = kv.pool.clone()
        with torch.no_grad():
            looped = model.features(ids, positions, meta, kv, fused_decode=False)
            pool_looped = kv.pool.clone()
            kv.pool.copy_(before)
            x = model.transformer.wte(ids) + model.transformer.wpe(positions)
            assert model._fused_decode_runs(x, meta, kv), "the fused path should run for this step"
            fused = model.features(ids, positions, meta, kv)
        assert torch.equal(fused, looped), f"batch {batch}: max diff {(fused - looped).abs().max().item()}"
        assert torch.equal(kv.pool, pool_looped), f"batch {batch}: the pool differs"
