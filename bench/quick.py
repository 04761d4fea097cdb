"""`--quick`: any benchmark command shrunk to a smoke run of the same code path.

Every benchmark module takes `--quick`; it keeps the command's arms, modes, policies and
workload and shrinks only counts and sizes (requests, tokens, rounds, rates of a sweep, the model
to `dummy:tiny`), and writes results to a scratch file instead of bench/results/. Its numbers mean
nothing: it proves the command runs as written. tests/test_doc_commands.py runs every
`python -m bench.*` command of the README and docs/ with it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable

Shrink = Callable[[Any], Any]


def at_most(limit: int) -> Shrink:
    return lambda value: min(value, limit)


def first_of(count: int) -> Shrink:
    """The first `count` entries of a comma-separated list (a sweep's rates, batch sizes)."""
    return lambda value: ",".join(value.split(",")[:count]) if value else value


def fast_sweep(count: int = 1, min_rate: float = 4.0) -> Shrink:
    """The first `count` rates of a sweep (one: every policy and mode still runs, and the
    comparison after the sweep), scaled so the slowest sends `min_rate` requests a
    second (a quick run's few requests would otherwise wait on a slow arrival schedule)."""

    def shrink(value: str) -> str:
        if not value:
            return value
        rates = [float(r) for r in value.split(",")[:count]]
        scale = max(1.0, min_rate / min(rates))
        return ",".join(f"{r * scale:g}" for r in rates)

    return shrink


def scratch_file(name: str) -> Shrink:
    return lambda _: Path(tempfile.mkdtemp(prefix="bench-quick-")) / name


def scratch_dir() -> Shrink:
    return lambda _: tempfile.mkdtemp(prefix="bench-quick-")


def shared_prefix_shrink() -> dict[str, Any]:
    """The shared-prefix workload's shape at a smoke run's size (bench.benchmark and bench.serve)."""
    return dict(
        model="dummy:tiny",
        num_requests=at_most(4),
        num_groups=at_most(2),
        prompts_per_group=at_most(2),
        system_prompt_tokens=at_most(32),
        question_tokens=at_most(8),
    )


def add_quick_flag(parser: argparse.ArgumentParser, **shrink: Any) -> None:
    """`shrink`: argument dest -> its quick value, or a function of the value given."""
    said = ", ".join(f"{dest}" for dest in shrink)
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run of the same code path (shrinks {said}); numbers mean nothing"
    )
    parser.set_defaults(quick_shrink=shrink)


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    if getattr(args, "quick", False):
        for dest, value in args.quick_shrink.items():
            setattr(args, dest, value(getattr(args, dest)) if callable(value) else value)
        print(f"--quick: {', '.join(f'{d}={getattr(args, d)}' for d in args.quick_shrink)}")
    return args
