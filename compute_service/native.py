"""The CPU kernels (compute_service/csrc/*.cpp): built once into one extension module, loaded once.

`python -m compute_service.native --build` compiles them (run by `make install` and the image
build) into torch's extension cache. Where a C++ compiler is installed, kernels that do not build
fail that step (and the tests); the PyTorch paths are for machines without a compiler and for
other devices. Build flags follow the native-kernel policy in docs/architecture.md: the architecture's
baseline, with wider instructions picked at load time (target_clones, or AVX2/AVX-512 target
regions chosen by __builtin_cpu_supports), never
-march=native, so an image built on an AVX-512 host runs on any x86-64 node.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(str(p) for p in CSRC.glob("*.cpp"))
# Baseline code for the architecture (x86-64: SSE2); AVX2/AVX-512 variants are chosen at load time.
BASELINE_CFLAGS = ["-march=x86-64", "-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []
EXTRA_CFLAGS = ["-O3", "-fopenmp", *BASELINE_CFLAGS]
_ext = None
_ext_failed = False


def compiler_available() -> bool:
    """True where a C++ compiler is installed: there the kernels must build."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def build_extension(verbose: bool = False):
    """Compile (first time; cached by torch per sources and flags) and import the kernels.
    Raises whatever the build raises."""
    return compile_module("paged_nanogpt_cpu_kernels", SOURCES, verbose)


def compile_module(name: str, sources: list[str], verbose: bool = False):
    """A C++ extension module built under the kernels' build policy (also bench/roofline.py's
    bandwidth probe, which is a benchmark tool and not part of the serving kernels)."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=sources, extra_cflags=EXTRA_CFLAGS, extra_ldflags=["-fopenmp"], verbose=verbose)


def load_extension():
    """The kernels' module, or None where it cannot run (warned once; PyTorch paths serve)."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    try:
        _ext = build_extension()
    except Exception as exc:  # no compiler, no ninja, unsupported platform...
        _ext_failed = True
        log.warning("C++ CPU kernels unavailable (%s); using the PyTorch paths", exc)
    return _ext


def main(argv: list[str]) -> int:
    """`--build`: compile the kernels now. Exit 1 if that fails where a compiler is installed, or
    (`--require`, image builds) if there is no compiler at all."""
    if "--build" not in argv:
        print("usage: python -m compute_service.native --build [--require] [-v]", file=sys.stderr)
        return 2
    if not compiler_available():
        print("C++ CPU kernels: no C++ compiler here; the engine uses the PyTorch paths", file=sys.stderr)
        return 1 if "--require" in argv else 0
    try:
        build_extension(verbose="-v" in argv)
    except Exception as exc:
        print(f"C++ CPU kernels FAILED to build with a compiler present: {exc}", file=sys.stderr)
        return 1
    print("C++ CPU kernels: built (baseline code; on x86-64 AVX2/AVX-512 variants picked at load time)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
