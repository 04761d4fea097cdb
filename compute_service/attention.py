"""Decode attention over the paged KV cache: a C++ kernel that reads blocks in place, with a
pure-PyTorch fallback (gather into a reused buffer, then SDPA) for other devices and dtypes.

The backend is chosen by PAGED_ATTENTION_BACKEND = auto (default) | cpp | torch. The kernel is
compiled by `python -m compute_service.attention --build` (run by `make install` and the image
build) into torch's extension cache. Where a C++ compiler is installed, a kernel that does not
build fails that step (and the tests); the fallback is for machines without a compiler and for
other devices and dtypes. Build flags follow the native-kernel policy in the README: the
architecture's baseline, with wider instructions picked at load time (see the .cpp), never
-march=native.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# Baseline code for the architecture (x86-64: SSE2); AVX2/AVX-512 variants are chosen at load time.
BASELINE_CFLAGS = ["-march=x86-64", "-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []
EXTRA_CFLAGS = ["-O3", "-fopenmp", *BASELINE_CFLAGS]
_ext = None
_ext_failed = False


def compiler_available() -> bool:
    """True where a C++ compiler is installed: there the kernel must build."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def build_extension(verbose: bool = False):
    """Compile (first time; cached by torch per source and flags) and import the C++ kernel.
    Raises whatever the build raises."""
    from torch.utils.cpp_extension import load

    return load(name="paged_attention_cpu", sources=[str(_SOURCE)], extra_cflags=EXTRA_CFLAGS,
                extra_ldflags=["-fopenmp"], verbose=verbose)


def load_extension():
    """The C++ kernel, or None where it cannot run (warned once; the fallback serves)."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    try:
        _ext = build_extension()
    except Exception as exc:  # no compiler, no ninja, unsupported platform...
        _ext_failed = True
        log.warning("paged attention C++ kernel unavailable (%s); using the PyTorch fallback", exc)
    return _ext


def _backend() -> str:
    backend = os.environ.get("PAGED_ATTENTION_BACKEND", "auto")
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"PAGED_ATTENTION_BACKEND must be auto, cpp or torch, got {backend!r}")
    return backend


def paged_decode_attention(
    q: torch.Tensor,  # (B, nh, hs)
    k_cache: torch.Tensor,  # (num_blocks, nh, block_size, hs)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
) -> torch.Tensor:  # (B, nh, hs)
    backend = _backend()
    use_cpp = q.device.type == "cpu" and q.dtype == torch.float32 and backend != "torch"
    if use_cpp and load_extension() is not None:
        return _ext.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    if backend == "cpp":
        raise RuntimeError("PAGED_ATTENTION_BACKEND=cpp but the C++ kernel cannot run here")
    return torch_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def torch_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference path: index_select every sequence's blocks, then masked SDPA."""
    batch, max_blocks = block_tables.shape
    _, n_head, block_size, head_dim = k_cache.shape
    flat = block_tables.reshape(-1).long()
    # (B, max_blocks, nh, bs, hs) -> (B, nh, max_blocks * bs, hs)
    keys = k_cache.index_select(0, flat).view(batch, max_blocks, n_head, block_size, head_dim)
    values = v_cache.index_select(0, flat).view(batch, max_blocks, n_head, block_size, head_dim)
    keys = keys.transpose(1, 2).reshape(batch, n_head, max_blocks * block_size, head_dim)
    values = values.transpose(1, 2).reshape(batch, n_head, max_blocks * block_size, head_dim)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = positions[None, :] < context_lens[:, None].to(q.device)  # (B, T) True = attend
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale
    )  # (B, nh, 1, hs)
    return out.squeeze(2)


def main(argv: list[str]) -> int:
    """`--build`: compile the kernel now. Exit 1 if it fails where a compiler is installed, or
    (`--require`, image builds) if there is no compiler at all."""
    if "--build" not in argv:
        print("usage: python -m compute_service.attention --build [--require] [-v]", file=sys.stderr)
        return 2
    if not compiler_available():
        print("paged attention C++ kernel: no C++ compiler here; the engine uses the PyTorch fallback",
              file=sys.stderr)
        return 1 if "--require" in argv else 0
    try:
        build_extension(verbose="-v" in argv)
    except Exception as exc:
        print(f"paged attention C++ kernel FAILED to build with a compiler present: {exc}", file=sys.stderr)
        return 1
    print("paged attention C++ kernel: built (baseline code; on x86-64 AVX2/AVX-512 variants picked at load time)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
