"""The CPU kernels (compute_service/csrc/*.cpp): built once into one extension module, loaded once.

`python -m compute_service.native --build` compiles them (run by `make install` and the image
build) into torch's extension cache. Where a C++ compiler is installed, kernels that do not build
fail that step (and the tests); the PyTorch paths are for machines without a compiler and for
other devices. Build flags follow the native-kernel policy in docs/architecture.md: the architecture's
baseline, with wider instructions picked at load time (target_clones, or AVX2/AVX-512 target
regions chosen by __builtin_cpu_supports), never
-march=native, so an image built on an AVX-512 host runs on any x86-64 node.

Prebuilt (the image): `python -m compute_service.native --build --require --install-to DIR` also
copies the built library to DIR/paged_nanogpt_cpu_kernels.so, and the environment variable
PAGED_NANOGPT_KERNELS=DIR/paged_nanogpt_cpu_kernels.so makes `load_extension` import that file
directly (after torch, whose libraries it links against): nothing is compiled, no compiler and no
writable extension cache (TORCH_EXTENSIONS_DIR, its lock files) is needed. A file so named that is
missing or does not load raises, at the engine's start-up, instead of falling back to the slower
PyTorch paths. Unset (`make install`, the tests): torch's JIT build and cache, as described above.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(str(p) for p in CSRC.glob("*.cpp"))
MODULE = "paged_nanogpt_cpu_kernels"
PREBUILT_ENV = "PAGED_NANOGPT_KERNELS"  # the prebuilt library's path (the image sets it)
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
    return compile_module(MODULE, SOURCES, verbose)


def compile_module(name: str, sources: list[str], verbose: bool = False):
    """A C++ extension module built under the kernels' build policy (also bench/roofline.py's
    bandwidth probe, which is a benchmark tool and not part of the serving kernels)."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=sources, extra_cflags=EXTRA_CFLAGS, extra_ldflags=["-fopenmp"], verbose=verbose)


def prebuilt_path() -> Path | None:
    """The prebuilt library PAGED_NANOGPT_KERNELS names, or None (unset or empty: build with torch)."""
    value = os.environ.get(PREBUILT_ENV, "")
    return Path(value) if value else None


def load_prebuilt(path: Path):
    """Import the kernels from a library built earlier (`--install-to`); never compiles. Raises
    RuntimeError, naming the path, if the file is missing or does not import."""
    import torch  # noqa: F401 - loads libc10/libtorch_cpu/libtorch_python (and libgomp) the library links against

    if not path.is_file():
        raise RuntimeError(f"{PREBUILT_ENV}={path}: no such file (the prebuilt C++ CPU kernels)")
    try:
        spec = importlib.util.spec_from_file_location(MODULE, path)
        if spec is None or spec.loader is None:
            raise ImportError("not an extension module file name")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:
        raise RuntimeError(f"{PREBUILT_ENV}={path}: the prebuilt C++ CPU kernels do not load: {exc}") from exc
    return module


def load_extension():
    """The kernels' module, or None where it cannot run (warned once; PyTorch paths serve). With
    PAGED_NANOGPT_KERNELS set, the prebuilt library or a RuntimeError: never a silent fallback."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    path = prebuilt_path()
    if path is not None:
        _ext = load_prebuilt(path)  # raises, and again at the next call: a configured library must load
        log.info("C++ CPU kernels loaded from the prebuilt library %s", path)
        return _ext
    try:
        _ext = build_extension()
    except Exception as exc:  # no compiler, no ninja, unsupported platform...
        _ext_failed = True
        log.warning("C++ CPU kernels unavailable (%s); using the PyTorch paths", exc)
    return _ext


def install(module, directory: Path) -> Path:
    """Copy the built library into `directory` as paged_nanogpt_cpu_kernels.so (read-only for all)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{MODULE}.so"
    target.unlink(missing_ok=True)  # an earlier copy is read-only
    shutil.copyfile(module.__file__, target)
    target.chmod(0o444)
    return target


def main(argv: list[str]) -> int:
    """`--build`: compile the kernels now. Exit 1 if that fails where a compiler is installed, or
    (`--require`, image builds) if there is no compiler at all. `--install-to DIR`: then copy the
    library to DIR (for PAGED_NANOGPT_KERNELS)."""
    usage = "usage: python -m compute_service.native --build [--require] [--install-to DIR] [-v]"
    install_to = None
    if "--install-to" in argv:
        at = argv.index("--install-to")
        if at + 1 >= len(argv):
            print(usage, file=sys.stderr)
            return 2
        install_to = Path(argv[at + 1])
    if "--build" not in argv:
        print(usage, file=sys.stderr)
        return 2
    if not compiler_available():
        print("C++ CPU kernels: no C++ compiler here; the engine uses the PyTorch paths", file=sys.stderr)
        return 1 if "--require" in argv else 0
    try:
        module = build_extension(verbose="-v" in argv)
    except Exception as exc:
        print(f"C++ CPU kernels FAILED to build with a compiler present: {exc}", file=sys.stderr)
        return 1
    print("C++ CPU kernels: built (baseline code; on x86-64 AVX2/AVX-512 variants picked at load time)")
    if install_to is not None:
        print(f"C++ CPU kernels: installed as {install(module, install_to)} (load it with {PREBUILT_ENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
