"""The C++ kernel, the PyTorch fallback and plain attention over the same tokens agree; where a
compiler is installed the kernel builds (never silently replaced by the fallback) and follows the
native-kernel build policy: baseline code, wider instructions only in the load-time variants."""
import math
import platform
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compute_service import attention
from compute_service.engine import InferenceEngine
from common.sampling_params import SamplingParams
from tests.conftest import hf_greedy, random_prompt


def make_case(batch=5, n_head=4, head_dim=64, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 200, (batch,), generator=gen, dtype=torch.int32)
    max_blocks = int(math.ceil(lens.max().item() / block_size))
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks]
    tables = perm.view(batch, max_blocks).to(torch.int32)
    tables[1, :2] = tables[0, :2]  # shared prefix blocks, as after a fork
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
    if not attention.compiler_available():
        pytest.skip("no C++ compiler on this machine: the engine runs the PyTorch fallback here")
    return attention.build_extension()


def test_the_kernel_is_built_for_the_baseline_and_picks_wider_instructions_at_load_time():
    """An image built on an AVX-512 host must run on an older x86-64 node: no -march=native, and
    every AVX/AVX-512 instruction in the binary sits in the variant the loader picks only on a CPU
    that has it."""
    assert not any("native" in flag for flag in attention.EXTRA_CFLAGS)
    library = built_kernel().__file__
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the load-time variants are x86-64's")
    assert shutil.which("objdump"), "binutils (objdump) come with the C++ compiler"
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    wide: dict[str, set[str]] = {}  # function -> register kinds its instructions use
    function = ""
    for line in listing.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            function = m.group(1)
        for kind in re.findall(r"%(ymm|zmm)", line):
            wide.setdefault(function, set()).add(kind)
    assert wide, "no vector variant was compiled"
    for function, kinds in wide.items():
        variant = function.rsplit(".", 1)[-1]
        assert variant in ("avx2", "avx512f"), f"{function} uses {kinds} outside a load-time variant"
        assert variant == "avx512f" or "zmm" not in kinds, f"{function}: AVX-512 registers in the AVX2 variant"
    assert {f.rsplit(".", 1)[-1] for f in wide} == {"avx2", "avx512f"}


def test_engine_with_the_torch_fallback_still_matches_hf(hf_gpt2_dir, hf_model, monkeypatch):
    monkeypatch.setenv("PAGED_ATTENTION_BACKEND", "torch")
    engine = InferenceEngine(model=str(hf_gpt2_dir), kv_budget_tokens=1024)
    prompt = random_prompt(np.random.default_rng(3), 40)
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    assert engine.generate([prompt], params)[0].token_ids == hf_greedy(hf_model, prompt, 16)
