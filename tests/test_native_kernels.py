"""The CPU kernels besides attention: the weight-streaming linear layer (every weight format) and
the bandwidth probe agree with torch, and the whole extension follows the native-kernel build
policy: baseline code, wider instructions only in variants picked at run time."""

import platform
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from bench import roofline
from compute_service import linear, native

EMPTY = torch.empty(0)


def built():
    """The extension; a build failure where a compiler exists fails the test (a bug, not a skip)."""
    if not native.compiler_available():
        pytest.skip("no C++ compiler on this machine: the engine runs the PyTorch paths here")
    ext = native.build_extension()
    if not ext.skinny_linear_isa():
        pytest.skip("this CPU has neither AVX2+FMA nor AVX-512: F.linear serves every product")
    return ext


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 16])
@pytest.mark.parametrize("out_features,in_features,bias", [(2304, 768, True), (50257 // 7, 64, False), (6, 3072, True)])
def test_skinny_linear_matches_f_linear(rows, out_features, in_features, bias):
    """Every tile shape (4 output rows x 4 or 2 input rows, and the remainders of both)."""
    ext = built()
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = ext.skinny_linear(x, w, EMPTY, EMPTY if b is None else b)
    assert got.shape == (rows, out_features)
    # float32 sums of `in_features` products in another order: a few ulps of the row's magnitude
    assert (got.double() - expected).abs().max() < 1e-5 * in_features**0.5 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_rows_output_does_not_depend_on_its_batch(dtype):
    """Bit for bit the same output alone or among 2-32 rows of x, and whether a weight row sits
    in a four-row tile or is computed on its own: a sequence's tokens must not depend on what
    else the step runs (the engine's batches change every step; greedy and seeded outputs are
    promised identical)."""
    ext = built()
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(1030, 768, generator=gen)  # 2 threads: slabs of 516 and 514 rows, parts of 129 and 128, 2 left
    scale = EMPTY
    if dtype == torch.int8:
        w, scale = (
            torch.randint(-127, 128, (1030, 768), generator=gen, dtype=torch.int8),
            torch.rand(1030, generator=gen),
        )
    elif dtype == torch.bfloat16:
        w = w.to(torch.bfloat16)
    b = torch.randn(1030, generator=gen)
    x = torch.randn(32, 768, generator=gen)
    alone = torch.cat([ext.skinny_linear(x[i : i + 1], w, scale, b) for i in range(32)])
    for rows in (2, 3, 5, 16, 32):
        assert torch.equal(ext.skinny_linear(x[:rows], w, scale, b), alone[:rows]), f"{rows} rows"
    for n in (0, 128, 129, 515, 516, 1029):  # part starts and ends, the leftover row: each as a 1-row weight
        one_row = ext.skinny_linear(x[:3], w[n : n + 1], scale[n : n + 1] if scale.numel() else EMPTY, b[n : n + 1])
        assert torch.equal(one_row[:, 0], alone[:3, n]), f"weight row {n}"


def test_bfloat16_and_int8_weights_compute_with_the_rounded_weights_exactly():
    """The low-precision formats round the weights only: the products are those of the rounded
    weights in float32 (so their error against float32 weights is the rounding's alone)."""
    ext = built()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 768, generator=gen)
    w = torch.randn(1000, 768, generator=gen) * 0.02
    b = torch.randn(1000, generator=gen)
    w_bf16 = w.to(torch.bfloat16)
    got = ext.skinny_linear(x, w_bf16, EMPTY, b)
    assert (got - F.linear(x, w_bf16.float(), b)).abs().max() < 1e-4
    q, scale = linear.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None]) - w).abs().max() <= scale.max() / 2 + 1e-7  # round to nearest
    got = ext.skinny_linear(x, q, scale, b)
    assert (got - F.linear(x, q.float() * scale[:, None], b)).abs().max() < 1e-4


def test_bad_arguments_are_refused_not_misread():
    ext = built()
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.skinny_linear(torch.randn(2, 60), torch.randn(8, 60), EMPTY, EMPTY)
    with pytest.raises(RuntimeError, match="scales"):
        ext.skinny_linear(x, torch.zeros(8, 64, dtype=torch.int8), EMPTY, EMPTY)
    with pytest.raises(RuntimeError, match="bias"):
        ext.skinny_linear(x, torch.randn(8, 64), EMPTY, torch.randn(7))


def test_linear_module_takes_the_kernel_for_few_rows_and_torch_otherwise(monkeypatch):
    """Same numbers either way, and training (autograd) never reaches the kernel."""
    built()
    layer = linear.Linear(64, 96)
    calls = []
    real = linear.skinny_kernel()
    monkeypatch.setattr(linear, "skinny_kernel", lambda: _Recorder(real, calls))
    with torch.inference_mode():
        few, many = torch.randn(linear.SKINNY_MAX_ROWS, 64), torch.randn(linear.SKINNY_MAX_ROWS + 1, 64)
        assert torch.allclose(layer(few), F.linear(few, layer.weight, layer.bias), atol=1e-5)
        assert len(calls) == 1
        layer(many)
        assert len(calls) == 1
    out = layer(torch.randn(2, 64))  # grad enabled, weight requires grad: F.linear, differentiable
    out.sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None


class _Recorder:
    def __init__(self, ext, calls):
        self.ext, self.calls = ext, calls

    def skinny_linear(self, *args):
        self.calls.append(args)
        return self.ext.skinny_linear(*args)


def test_argmax_rows_picks_what_torch_argmax_picks():
    """The greedy token of every row (compute_service.sampling.greedy_tokens): the first of equal
    maxima, anywhere in the row, the first NaN where there is one, 0 for a row of -inf."""
    ext = built()
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 50257, generator=gen)
    logits[1, 7] = logits[1, 50256] = 10.0  # a tie: the first one
    logits[2, 63] = logits[2, 64] = 10.0  # a tie across the 64-value chunks of the search
    logits[3, 100], logits[3, 300], logits[3, 5] = float("nan"), float("nan"), 1e30  # NaN wins, as in torch
    logits[4] = float("-inf")
    logits[5, 50256] = 10.0  # the last value
    logits[6, 0] = 10.0  # the first value
    logits[7] = 0.0  # all equal
    assert ext.argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
    short = torch.randn(3, 5, generator=gen)  # shorter than one vector
    assert ext.argmax_rows(short).tolist() == short.argmax(dim=-1).tolist()
    with pytest.raises(RuntimeError, match="float32"):
        ext.argmax_rows(logits.double())


def test_bandwidth_probe_reads_every_element():
    built()  # a compiler is here
    ext = roofline.probe_extension()
    buf = torch.arange(64 * 1000, dtype=torch.float32) % 7
    assert ext.stream_read_sum(buf) == pytest.approx(float(buf.double().sum()))
    with pytest.raises(RuntimeError, match="multiple of 64"):  # a tail would go unread
        ext.stream_read_sum(buf[:-1])


def wide_functions(library: str) -> dict[str, set[str]]:
    """function -> the wide register kinds (ymm, zmm) its instructions use, from objdump."""
    assert shutil.which("objdump"), "binutils (objdump) come with the C++ compiler"
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    wide: dict[str, set[str]] = {}
    function = ""
    for line in listing.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            function = m.group(1)
        for kind in re.findall(r"%(ymm|zmm)", line):
            wide.setdefault(function, set()).add(kind)
    assert wide, f"no vector variant was compiled into {library}"
    return wide


def test_kernels_are_built_for_the_baseline_and_pick_wider_instructions_at_run_time():
    """An image built on an AVX-512 host must run on an older x86-64 node: no -march=native, and
    every AVX/AVX-512 instruction in the binary sits in a variant chosen only on a CPU that has it:
    a target_clones variant (.avx2, .avx512f, .arch_x86_64_v3/v4) or the isa_avx2 / isa_avx512
    namespaces of skinny_linear and bench's read probe, which pick theirs with __builtin_cpu_supports."""
    assert not any("native" in flag for flag in native.EXTRA_CFLAGS)
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the run-time variants are x86-64's")
    if not native.compiler_available():
        pytest.skip("no C++ compiler on this machine")
    for library in (native.build_extension().__file__, roofline.probe_extension().__file__):
        wide = wide_functions(library)
        variants = set()
        for function, kinds in wide.items():
            suffix = function.rsplit(".", 1)[-1]
            if suffix in ("avx512f", "arch_x86_64_v4") or "isa_avx512" in function:
                variants.add("avx512")
            elif suffix in ("avx2", "arch_x86_64_v3") or "isa_avx2" in function:
                assert "zmm" not in kinds, f"{function}: AVX-512 registers in an AVX2 variant"
                variants.add("avx2")
            else:
                raise AssertionError(f"{function} uses {kinds} outside a run-time variant")
        assert variants == {"avx2", "avx512"}, library
    wide = wide_functions(native.build_extension().__file__)
    # The row loops (row_ops.cpp) are plain C++ that GCC must vectorize; a compare it cannot
    # if-convert or a call it does not inline leaves them scalar (same results, slower steps).
    for loop in ("gelu_tanh_inplace", "layer_norm_row", "argmax_row"):
        assert any(loop in f and f.endswith(".avx2") and "ymm" in k for f, k in wide.items()), (
            f"{loop}: its AVX2 variant is scalar code"
        )
