"""Every benchmark command the README and docs/ show runs as written: each fenced
`python -m bench.*` line (continuations joined, comments dropped) is run with `--quick`, which
keeps the command's arms, modes and workload and shrinks only counts, sizes and the model
(bench/quick.py). A doc that shows a command a module no longer accepts fails here.

One exception, stated: llama.cpp peers need `make peers` (llama.cpp compiled from its sdist, several
minutes, and llama-server built from the same sdist), which `make test` does not run. Where
llama-cpp-python is not installed, a command's llama-cpp-* peers are left out of its `--peers`,
and where llama-server is not built, `llama-server`; the rest of the command runs.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.build_llama_server import binary_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAVE_LLAMA_SERVER = HAVE_LLAMA_CPP and binary_path().exists()  # it runs on the GGUF llama-cpp-python writes


def doc_commands() -> list[str]:
    """Distinct `python -m bench.*` command lines in fenced blocks, in order of appearance."""
    found: dict[str, None] = {}
    for path in DOCS:
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#.*$", "", line).strip()
                if re.match(r"^(\w+=\S+\s+)*python -m bench\.", line):
                    found[" ".join(line.split())] = None
    return list(found)


def runnable(command: str) -> list[str]:
    argv = shlex.split(command)
    argv[argv.index("python")] = sys.executable
    if "--peers" in argv:
        at = argv.index("--peers")
        peers = [
            p
            for p in argv[at + 1].split(",")
            if (HAVE_LLAMA_CPP or not p.startswith("llama-cpp")) and (HAVE_LLAMA_SERVER or p != "llama-server")
        ]
        argv[at : at + 2] = ["--peers", ",".join(peers)] if peers else []
    return [*argv, "--quick"]


def distinct_runs(commands: list[str]) -> list[str]:
    """The commands whose runnable form differs (two that differ only in a peer not installed run once)."""
    seen: dict[tuple[str, ...], str] = {}
    for command in commands:
        seen.setdefault(tuple(runnable(command)), command)
    return list(seen.values())


COMMANDS = distinct_runs(doc_commands())


def test_the_docs_show_the_benchmark_commands():
    modules = {re.search(r"-m (bench\.\w+)", c).group(1) for c in COMMANDS}
    assert len(COMMANDS) >= 20 and {"bench.benchmark", "bench.serve", "bench.chaos"} <= modules, COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i}-{c.split()[2]}" for i, c in enumerate(COMMANDS)])
def test_a_documented_benchmark_command_runs_as_written(command, tmp_path):
    argv = runnable(command)
    env_assignments = [a for a in argv if re.match(r"^\w+=", a) and argv.index(a) < argv.index(sys.executable)]
    env = {**__import__("os").environ, **dict(a.split("=", 1) for a in env_assignments)}
    argv = argv[len(env_assignments) :]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, f"{command}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
