"""The routing policies side by side (bench.serve with `--routing round-robin,least-loaded,kv-aware`
and a `--sweep`): a table of every run, each policy's sustainable rate, then one more run of
round-robin and kv-aware at 0.8x round-robin's sustainable rate (the rate the sweep found), where
their TTFT is compared. Last line, machine-readable:
`kv_aware_rate_ratio=<sustainable rate kv-aware / round-robin> kv_aware_ttft_ratio=<TTFT p50
kv-aware / round-robin at that rate> hit_rate=<kv-aware's prefix hit rate there>`.
"""

from __future__ import annotations

import argparse
from typing import Callable

COLUMNS = (
    "request_rate",
    "completed",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "mean_normalized_latency_ms",
    "output_token_throughput",
    "prefix_hit_rate",
    "requests_per_replica",
)


def print_table(rows: list[dict]) -> None:
    print("| policy | " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * (len(COLUMNS) + 1))
    for row in rows:
        cells = [f"{row.get(c, ''):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in COLUMNS]
        print(f"| {row['routing']} | " + " | ".join(cells) + " |")


def compare_policies(
    args: argparse.Namespace,
    by_arm: dict[tuple[str, str], list[dict]],
    sustained: dict[tuple[str, str], tuple[float, float]],
    bench_one: Callable[..., tuple[dict, list]],
) -> None:
    mode = args.modes[0]
    rows = [row for policy in args.routing for row in by_arm[(mode, policy)]]
    print_table(rows)
    for policy in args.routing:
        best, crossing = sustained[(mode, policy)]
        print(f"{policy}: sustainable rate {best} req/s (2x line crossed at {crossing:.3f})")
    rr_rate, kv_rate = sustained[(mode, "round-robin")][0], sustained[(mode, "kv-aware")][0]
    rate = round(0.8 * rr_rate, 4)
    print(f"at 0.8 x round-robin's sustainable rate = {rate} req/s:")
    at = {policy: bench_one(args, mode, rate, policy)[0] for policy in ("round-robin", "kv-aware")}
    print_table(list(at.values()))
    ttft_ratio = at["kv-aware"]["median_ttft_ms"] / at["round-robin"]["median_ttft_ms"]
    print(
        f"kv_aware_rate_ratio={kv_rate / rr_rate:.2f} kv_aware_ttft_ratio={ttft_ratio:.3f} "
        f"hit_rate={at['kv-aware']['prefix_hit_rate']:.3f}"
    )
