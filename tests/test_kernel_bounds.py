"""A malformed internal request is a RuntimeError before anything touches memory, never a crash
or a write into another sequence's KV: the C++ kernels check every block id they will follow
against the pool and every shape that sets a stride or a loop bound, the fused decode step
(csrc/decode_step.cpp) and the Python layer loop (kv_write_check.check_decode_writes) refuse a slot
outside the writing sequence's own table, and a refused step leaves the pool as it was."""

from __future__ import annotations

import pytest
import torch

from compute_service.kv_cache import KVCache
from compute_service.model import AttentionMetadata
from compute_service.weights import load_model
from tests.test_fused_decode import decode_step
from tests.test_native_kernels import built
from tests.test_paged_attention_kernel import built_kernel, make_case


def test_attention_refuses_a_block_outside_the_pool():
    ext = built_kernel()
    q, k, v, tables, lens = make_case()
    num_blocks = k.shape[0]
    for bad in (num_blocks, 4096, -1):
        broken = tables.clone()
        broken[2, 0] = bad  # the first block: always inside the context
        with pytest.raises(RuntimeError, match=rf"block_tables\[2\]\[0\] holds block {bad} outside the pool"):
            ext.paged_attention_decode(q, k, v, broken, lens, 0.125)


def test_attention_ignores_table_entries_past_the_context():
    """Only the blocks a context uses are read (and checked): padding may hold anything."""
    ext = built_kernel()
    q, k, v, tables, lens = make_case()
    lens[0] = 1  # one block used; the rest of the row is padding
    padded = tables.clone()
    padded[0, 1:] = -7
    clean = ext.paged_attention_decode(q, k, v, tables, lens, 0.125)
    assert torch.equal(ext.paged_attention_decode(q, k, v, padded, lens, 0.125), clean)


def test_attention_refuses_shapes_that_disagree():
    ext = built_kernel()
    q, k, v, tables, lens = make_case()  # q (5, 4, 64), caches (num_blocks, 4, 16, 64)
    capacity = tables.shape[1] * k.shape[2]
    cases = {
        "heads or head_dim": dict(q=q[:, :2]),
        "head_dim": dict(q=q[:, :, :32].contiguous()),
        "k_cache and v_cache must both be": dict(v=v[:-1]),
        "block_tables must be": dict(tables=tables[:-1]),
        "context_lens must be": dict(lens=lens[:-1]),
        "int32": dict(tables=tables.long()),
        "float32": dict(q=q.double()),
        rf"context_lens\[0\] = {capacity + 1} outside": dict(lens=torch.cat([lens[:1] * 0 + capacity + 1, lens[1:]])),
        r"context_lens\[0\] = 0 outside": dict(lens=torch.cat([lens[:1] * 0, lens[1:]])),
    }
    for message, bad in cases.items():
        args = dict(q=q, k=k, v=v, tables=tables, lens=lens) | bad
        with pytest.raises(RuntimeError, match=message):
            ext.paged_attention_decode(args["q"], args["k"], args["v"], args["tables"], args["lens"], 0.125)


def tiny_model_and_pool() -> tuple:
    """dummy:tiny (2 layers, 4 heads of 16) and a pool of random earlier k/v."""
    model = load_model("dummy:tiny")
    cfg = model.config
    kv = KVCache(cfg.n_layer, cfg.n_head, cfg.head_dim, num_blocks=64, block_size=16)
    kv.pool.copy_(torch.randn(kv.pool.shape, generator=torch.Generator().manual_seed(1)))
    return model, kv


def malformed(meta: AttentionMetadata, kv: KVCache, what: str) -> tuple[AttentionMetadata, str]:
    """A copy of a good 2-sequence decode step (they share their first block, as a cached
    prefix) broken one way, and the message that names the problem."""
    tables, slots, lens = meta.block_tables.clone(), meta.slot_mapping.clone(), meta.context_lens
    bs = kv.block_size
    last = [(int(n) - 1) // bs for n in lens]
    if what == "block outside the pool":
        tables[1, 0] = kv.num_blocks
        message = rf"block_tables\[1\]\[0\] holds block {kv.num_blocks} outside the pool"
    elif what == "negative block":
        tables[0, last[0]] = -1
        message = r"block_tables\[0\]\[\d+\] holds block -1 outside the pool"
    elif what == "slot in the other sequence's block":
        slots[0] = int(tables[1, last[1]]) * bs  # sequence 1's block, not sequence 0's
        message = r"slot_mapping\[0\] = \d+ is not the next slot of its sequence's own table"
    elif what == "negative slot":  # an indexed write would wrap it into the pool's last block
        slots[0] = -1
        message = r"slot_mapping\[0\] = -1 is not the next slot"
    else:  # "write into a block another sequence holds": consistent with its own table, yet shared
        assert what == "write into a shared block"
        tables[1, last[1]] = tables[0, last[0]]
        slots[1] = int(tables[1, last[1]]) * bs + (int(lens[1]) - 1) % bs
        message = "another sequence|which sequence"
    bad = AttentionMetadata(
        seq_lens=meta.seq_lens, num_decodes=meta.num_decodes, slot_mapping=slots, block_tables=tables, context_lens=lens
    )
    return bad, message


CASES = [
    "block outside the pool",
    "negative block",
    "slot in the other sequence's block",
    "negative slot",
    "write into a shared block",
]


@pytest.mark.parametrize("what", CASES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused C++ step", "python layer loop"])
def test_a_malformed_decode_step_is_refused_and_writes_nothing(what, fused):
    """The fused step is ext.decode_step (asserted to be what runs); the layer loop writes with
    torch indexing, which raises for a block past the pool but not for a negative or foreign slot."""
    if fused:
        built()
    model, kv = tiny_model_and_pool()
    ids, positions, meta = decode_step(2, kv, model.config.vocab_size, torch.Generator().manual_seed(5))
    assert int(meta.context_lens.min()) > kv.block_size  # two blocks each: a shared first, an own last
    bad, message = malformed(meta, kv, what)
    before = kv.pool.clone()
    with torch.no_grad():
        if fused:
            assert model._fused_decode_runs(ids, bad, kv), "the fused C++ step should be what runs"
        with pytest.raises(RuntimeError, match=message):
            model(ids, positions, bad, kv, fused_decode=fused)
        assert torch.equal(kv.pool, before), f"a refused step ({what}) wrote into the pool"
        model(ids, positions, meta, kv, fused_decode=fused)  # the good step still runs
    assert not torch.equal(kv.pool, before)
