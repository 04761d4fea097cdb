"""The compute side knows the memory service only through its contract: no module of
compute_service imports anything of memory_service but memory_service.contract, function-local
imports included (read from the source, so a lazy import cannot hide). The in-process allocator
that benchmarks and tests hand the engine lives outside compute_service (bench.local_engine)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = "memory_service.contract"


def memory_imports(path: Path) -> list[str]:
    """Every memory_service module the file imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "memory_service":
                found += [f"memory_service.{alias.name}" for alias in node.names]
            elif node.module.startswith("memory_service."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "memory_service"]
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "compute_service").rglob("*.py")), ids=lambda p: p.name)
def test_the_compute_side_imports_only_the_memory_contract(path):
    assert [m for m in memory_imports(path) if m != CONTRACT] == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from memory_service.step import LocalMemory\n    import memory_service.pools\n")
    assert memory_imports(source) == ["memory_service.step", "memory_service.pools"]
