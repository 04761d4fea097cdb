"""The C++ kernel, the PyTorch fallback and plain attention over the same tokens agree; where a
compiler is installed the kernel builds (never silently replaced by the fallback). The build
policy is checked in test_native_kernels.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from compute_service import attention, native
from tests.conftest import hf_greedy, random_prompt


def make_case(batch=5, n_head=4, head_dim=64, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 200, (batch,), generator=gen, dtype=torch.int32)
    max_blocks = int(math.ceil(lens.max().item() / block_size))
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks]
    tables = perm.view(batch, max_blocks).to(torch.int32)
    tables[1, :2] = tables[0, :2]  # shared prefix blocks, as after a prefix-cache hit
    k = torch.randn(num_blocks, n_head, block_size, head_dim, generator=gen)
    v = torch.randn(num_blocks, n_head, block_size, head_dim, generator=gen)
    q = torch.randn(batch, n_head, head_dim, generator=gen)
    return q, k, v, tables, lens


def dense_reference(q, k, v, tables, lens, scale):
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        keys = torch.cat([k[blk] for blk in tables[b].tolist()], dim=1)[:, :n]  # (nh, n, hs)
        vals = torch.cat([v[blk] for blk in tables[b].tolist()], dim=1)[:, :n]
        outs.append(F.scaled_dot_product_attention(q[b][:, None], keys, vals, scale=scale)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_kernel_and_fallback_match_dense_attention(block_size):
    q, k, v, tables, lens = make_case(block_size=block_size)
    expected = dense_reference(q, k, v, tables, lens, 0.125)
    fallback = attention.torch_paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert (fallback - expected).abs().max() < 1e-5
    kernel = built_kernel().paged_attention_decode(q, k, v, tables, lens, 0.125)
    assert (kernel - expected).abs().max() < 1e-5


def built_kernel():
    """The kernel; a build failure where a compiler exists fails the test (it is a bug, not a skip)."""
    if not native.compiler_available():
        pytest.skip("no C++ compiler on this machine: the engine runs the PyTorch fallback here")
    return native.build_extension()


def test_engine_with_the_torch_fallback_still_matches_hf(hf_gpt2_dir, hf_model, monkeypatch):
    """attention_backend=torch (a setting) runs the PyTorch fallback, and the fused decode step
    (which needs the C++ attention) stands aside."""
    calls = []
    fallback = attention.torch_paged_decode_attention
    monkeypatch.setattr(attention, "torch_paged_decode_attention", lambda *a: calls.append(1) or fallback(*a))
    engine = LocalEngine(model=str(hf_gpt2_dir), kv_budget_tokens=1024, attention_backend="torch")
    prompt = random_prompt(np.random.default_rng(3), 40)
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    assert engine.generate([prompt], params)[0].token_ids == hf_greedy(hf_model, prompt, 16)
    assert len(calls) == 15 * engine.model.config.n_layer  # every decode step, every layer
