"""Linear layers for decode speed: few-row products run a weight-streaming kernel, and the
weights it reads can be stored in bfloat16 or int8.

At decode a linear layer multiplies a few rows (one per running sequence) by a large matrix, so
its time is the time to read the matrix. torch's F.linear (MKL) does that at a third of the
machine's read bandwidth on the AMD CPUs we measured; `skinny_linear` (csrc/skinny_linear.cpp)
reads each weight row once for all rows at close to the bandwidth (docs/benchmarks.md, "Decode speed").
Above SKINNY_MAX_ROWS rows (prefill) a blocked GEMM is faster: oneDNN's where torch has it
(measured 2.2x MKL's sgemm at 512 rows on the AMD build machine), else F.linear.

Weight formats (EngineConfig.dtype / quantize): float32 (default, token-exact with HF), bfloat16
(half the bytes) or int8 with one float32 scale per output row (a quarter). The low-precision
copies serve the kernel's few-row products (decode); prefill keeps the float32 weights, which stay
resident (speed, not memory, is what these formats buy here). Multiply-adds are float32 in every
format: only the weights are rounded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compute_service.native import load_extension

# Rows of x up to which the kernel beats MKL/oneDNN: decode at 24 and 32 sequences ran faster with
# it than without, side by side (docs/benchmarks.md, "Decode speed", step 7).
SKINNY_MAX_ROWS = 32
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
NO_TENSOR = torch.empty(0)  # "none" for the kernels: no scale, no bias
# Many-row products (prefill) through oneDNN: 2.2x MKL's sgemm at 512 rows on the AMD build
# machine (MKL takes its AVX2 path there; docs/benchmarks.md, "Decode speed"). Inference only: no autograd.
_onednn_linear = (
    torch.ops.mkldnn._linear_pointwise.default
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    else None
)
_kernel = None
_kernel_checked = False


LINEAR_BACKENDS = ("auto", "torch")  # auto: the few-row kernel where it runs; torch: F.linear everywhere


def skinny_kernel():
    """The extension module if its skinny_linear can run on this CPU (AVX2+FMA or AVX-512), else
    None. Decided once per process: it is asked 49 times a decode step."""
    global _kernel, _kernel_checked
    if not _kernel_checked:
        ext = load_extension()
        _kernel = ext if ext is not None and ext.skinny_linear_isa() else None
        _kernel_checked = True
    return _kernel


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w ~= q * scale, |q| <= 127."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,)
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float().contiguous()


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) with the decode fast path."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight_format = "float32"
        self.decode_weight: torch.Tensor | None = None  # bf16 / int8 copy read by the kernel
        self.decode_scale: torch.Tensor | None = None  # (N,) int8 only
        self.backend = "auto"  # EngineConfig.linear_backend, set by GPT.set_backends

    def set_weight_format(self, weight_format: str) -> None:
        """Make the copy of the weights few-row products read (float32: the weights themselves)."""
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        w = self.weight.detach()
        self.weight_format = weight_format
        self.decode_scale = None
        if weight_format == "float32":
            self.decode_weight = None
        elif weight_format == "bfloat16":
            self.decode_weight = w.to(torch.bfloat16).contiguous()
        else:
            self.decode_weight, self.decode_scale = quantize_int8(w.float())

    def decode_args(self) -> list[torch.Tensor]:
        """(weight, scale, bias) as the few-row kernel reads them (empty tensors for none)."""
        weight = self.weight if self.decode_weight is None else self.decode_weight
        return [
            weight,
            NO_TENSOR if self.decode_scale is None else self.decode_scale,
            NO_TENSOR if self.bias is None else self.bias,
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fast paths are inference only (no autograd), as the engine runs. The decode copy is
        # made once by set_weight_format: loading new weights afterwards needs another call.
        if torch.is_grad_enabled() or x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        kernel = skinny_kernel() if self.backend == "auto" else None
        if kernel is not None and x.shape[0] <= SKINNY_MAX_ROWS and self.in_features % 16 == 0:
            return kernel.skinny_linear(x, *self.decode_args())
        if _onednn_linear is not None:
            return _onednn_linear(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
