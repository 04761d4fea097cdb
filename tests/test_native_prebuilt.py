"""The image's way to load the kernels (compute_service.native, PAGED_NANOGPT_KERNELS): a library
built once and copied with `--install-to` is imported directly, with no compiler, no torch
extension cache and no build; a configured library that is missing or broken stops the engine's
start-up with an error naming it, never a silent fallback to the PyTorch paths. Each case runs in
a fresh interpreter (the setting is read at the first load, and one process keeps its module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compute_service import native

ROOT = Path(__file__).resolve().parent.parent

# No build can happen in the child: torch's loader refuses, and there is no compiler or cache dir.
NO_BUILD = """
import torch.utils.cpp_extension as cpp_extension
def refuse(*args, **kwargs):
    raise AssertionError("compiled: the prebuilt library should have been imported")
cpp_extension.load = refuse
"""


def run(code: str, tmp_path: Path, library: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        native.PREBUILT_ENV: str(library),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "no-extension-cache"),
        "CXX": str(tmp_path / "no-compiler"),
    }
    return subprocess.run(
        [sys.executable, "-c", NO_BUILD + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`--build --require --install-to DIR`, as the image's build stage runs it (torch's cache
    makes it a copy where the kernels are already built)."""
    if not native.compiler_available():
        pytest.skip("no C++ compiler on this machine: nothing to prebuild")
    target = tmp_path_factory.mktemp("kernels")
    result = subprocess.run(
        [sys.executable, "-m", "compute_service.native", "--build", "--require", "--install-to", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    library = target / f"{native.MODULE}.so"
    assert library.stat().st_mode & 0o777 == 0o444, "installed read-only"
    return library


def test_the_prebuilt_library_loads_without_a_build_and_computes(installed, tmp_path):
    result = run(
        f"""
import torch, torch.nn.functional as F
from compute_service import native
ext = native.load_extension()
assert ext.__file__ == {str(installed)!r}, ext.__file__
x, w, b = torch.randn(3, 64), torch.randn(40, 64), torch.randn(40)
empty = torch.empty(0)
if ext.skinny_linear_isa():
    torch.testing.assert_close(ext.skinny_linear(x, w, empty, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
logits = torch.randn(5, 50)
assert ext.argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
print("loaded", ext.__file__)
""",
        tmp_path,
        installed,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {installed}" in result.stdout
    assert not (tmp_path / "no-extension-cache").exists(), "torch's extension cache was used"


@pytest.mark.parametrize("broken", ["missing", "not-a-library"])
def test_a_configured_library_that_does_not_load_stops_the_engine_start(tmp_path, broken):
    library = tmp_path / f"{native.MODULE}.so"
    if broken == "not-a-library":
        library.write_bytes(b"\x7fELF but not really")
    result = run(
        """
from bench.local_engine import LocalEngine
LocalEngine(model="dummy:tiny", kv_budget_tokens=256)
print("started")
""",
        tmp_path,
        library,
    )
    assert result.returncode != 0 and "started" not in result.stdout
    assert f"RuntimeError: {native.PREBUILT_ENV}={library}" in result.stderr, result.stderr[-3000:]
    assert ("no such file" if broken == "missing" else "do not load") in result.stderr
    assert "PyTorch paths" not in result.stderr, "fell back instead of failing"
