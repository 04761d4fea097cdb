"""Build llama.cpp's own `llama-server` from the llama-cpp-python sdist that `make peers` pins.

    python -m bench.build_llama_server          # `make peers` runs it; a no-op once built
The serving peer (bench/llama_server_peer.py) must be the llama.cpp that the decode peer loads
through llama-cpp-python, so the source is that package's sdist (its vendor/llama.cpp carries
tools/server), never a checkout of some other commit. The sdist is fetched once with `pip download`
into the cache folder below; from then on the build needs no network (the web UI is neither
downloaded nor built: -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF embed an empty UI).

The binary lives at ~/.cache/paged-nanogpt/llama-server-<version>/llama-server, beside the GGUF
cache (bench/decode_speed.GGUF_CACHE): outside the repository, so no checkout or `make clean`
rebuilds it. $LLAMA_SERVER_BIN names another binary (the benchmark then uses it as is and this
script builds nothing). Several minutes on 2 cores; never part of `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CACHE = Path.home() / ".cache" / "paged-nanogpt"

# Every cmake flag, in one place. The CPU build as llama-cpp-python's wheel is built from this sdist
# on this machine (Release, GGML_NATIVE=ON i.e. -march=native, OpenMP on: ggml's defaults), except:
# static libraries (one self-contained binary; the wheel needs shared ones for ctypes), only the
# server's targets, no web UI (an empty table, nothing downloaded), no OpenSSL (HTTP on loopback).
# LLAMA_CURL no longer exists in this llama.cpp (CMakeLists.txt: "deprecated and will be ignored").
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_OPENMP=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",  # tools/server is added under tools/ ...
    "-DLLAMA_BUILD_SERVER=ON",  # ... only with this one on as well
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
TARGET = "llama-server"


def pinned_version() -> str:
    """llama-cpp-python's version from pyproject's `peers` extra: the one place it is pinned."""
    match = re.search(r'"llama-cpp-python==([^"]+)"', PYPROJECT.read_text())
    if not match:
        raise SystemExit(f"no llama-cpp-python pin in {PYPROJECT}")
    return match.group(1)


def binary_path(version: str | None = None) -> Path:
    """Where the benchmark finds llama-server: $LLAMA_SERVER_BIN, else the cache folder's build."""
    if os.environ.get("LLAMA_SERVER_BIN"):
        return Path(os.environ["LLAMA_SERVER_BIN"])
    return CACHE / f"llama-server-{version or pinned_version()}" / TARGET


def fetch_sdist(version: str, into: Path) -> Path:
    """The sdist, downloaded once (pip's own cache also answers a second download offline)."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (into / name).exists():
        into.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            + [f"llama-cpp-python=={version}", "-d", str(into)],
            check=True,
        )
    return into / name


def source_tree(sdist: Path, work: Path) -> Path:
    """The sdist unpacked whole (its .git/modules lets cmake stamp llama.cpp's commit into the
    binary); returns vendor/llama.cpp after checking it is the source this script expects."""
    root = work / sdist.name.removesuffix(".tar.gz")
    if not root.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    src = root / "vendor" / "llama.cpp"
    if not (src / "tools" / "server" / "server.cpp").exists():
        raise SystemExit(f"{src} has no tools/server: this sdist cannot build llama-server")
    cmake_text = (src / "CMakeLists.txt").read_text() + (src / "ggml" / "CMakeLists.txt").read_text()
    missing = [f for f in CMAKE_FLAGS if f.startswith("-DLLAMA_") or f.startswith("-DGGML_")]
    missing = [f for f in missing if f"option({f[2:].split('=')[0]} " not in cmake_text]
    if missing:  # a renamed option would be silently ignored by cmake: refuse instead
        raise SystemExit(f"options not defined by this llama.cpp's CMakeLists: {missing}")
    return src


def build(version: str, dest: Path, jobs: int = 2) -> Path:
    work = dest.parent
    src = source_tree(fetch_sdist(version, work / "sdist"), work)
    build_dir = work / "build"
    t0 = time.perf_counter()
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", TARGET, f"-j{jobs}"], check=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copy2(build_dir / "bin" / TARGET, tmp)
    os.replace(tmp, dest)  # atomic: an interrupted build never leaves a binary that looks done
    (work / "cmake-flags.txt").write_text("\n".join(CMAKE_FLAGS) + "\n")
    print(f"built {dest} in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(build_dir)  # hundreds of MB of objects; the sdist stays for an offline rebuild
    shutil.rmtree(src.parent.parent)
    return dest


def main() -> None:
    dest = binary_path()
    if dest.exists():
        print(f"{dest} exists: nothing to build (remove it to rebuild)")
        return
    if os.environ.get("LLAMA_SERVER_BIN"):
        raise SystemExit(f"LLAMA_SERVER_BIN={dest} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    build(pinned_version(), dest, jobs=max(os.cpu_count() or 1, 1))
    print(subprocess.run([str(dest), "--version"], capture_output=True, text=True).stderr.strip())


if __name__ == "__main__":
    main()
