"""The verdict of `bench.serve --peers llama-server` (bench/serve_peers.py), kept apart from the runs.

One service level for both servers: TTFT p99 <= 2 s, TPOT p50 <= 3x OUR TPOT p50 at the lowest
swept rate (the issue's "3x ours": a bar set by what our stack does unloaded, not by each server's
own), and no failed request. A server's sustainable rate is the highest swept rate whose run meets
it, 0 when none does; the ratios are ours / llama-server's, `inf` when only ours meets it.
"""

from __future__ import annotations

import math

TTFT_P99_LIMIT_MS = 2000.0
TPOT_FACTOR = 3.0
TABLE_KEYS = (
    ("TTFT p50 (ms)", "median_ttft_ms"),
    ("TTFT p99 (ms)", "p99_ttft_ms"),
    ("TPOT p50 (ms)", "median_tpot_ms"),
    ("TPOT p99 (ms)", "p99_tpot_ms"),
    ("ITL p50 (ms)", "median_itl_ms"),
    ("ITL p99 (ms)", "p99_itl_ms"),
    ("output tok/s", "output_token_throughput"),
    ("failed", "failed"),
)


def meets_slo(row: dict, tpot_limit_ms: float) -> bool:
    return row["failed"] == 0 and row["p99_ttft_ms"] <= TTFT_P99_LIMIT_MS and row["median_tpot_ms"] <= tpot_limit_ms


def sustainable(rows: list[dict], tpot_limit_ms: float) -> float:
    """The highest swept rate whose run meets the service level; 0.0 when none does."""
    return max((r["request_rate"] for r in rows if meets_slo(r, tpot_limit_ms)), default=0.0)


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; inf when only ours is positive, nan when neither is."""
    if theirs > 0:
        return ours / theirs
    return math.inf if ours > 0 else math.nan


def summary_lines(workload: str, ours: list[dict], theirs: list[dict]) -> list[str]:
    """The verdict lines; the last one machine-readable."""
    by_rate = lambda rows: sorted(rows, key=lambda r: r["request_rate"])  # noqa: E731
    ours, theirs = by_rate(ours), by_rate(theirs)
    tpot_limit = TPOT_FACTOR * ours[0]["median_tpot_ms"]
    ours_rate, theirs_rate = sustainable(ours, tpot_limit), sustainable(theirs, tpot_limit)
    lines = [
        f"service level: TTFT p99 <= {TTFT_P99_LIMIT_MS:.0f} ms, TPOT p50 <= {tpot_limit:.1f} ms ({TPOT_FACTOR:g}x "
        f"ours at {ours[0]['request_rate']:g} req/s), no failed request",
        f"sustainable rate: ours {ours_rate:g} req/s, llama-server {theirs_rate:g} req/s",
    ]
    if theirs_rate == 0 and ours_rate > 0:
        lines.append(
            f"llama-server met the service level at no swept rate: the ratio is inf; taking the lowest swept rate "
            f"({ours[0]['request_rate']:g}) as its upper bound, ours is >= {ours_rate / ours[0]['request_rate']:.2f}x"
        )
    top_ours, top_theirs = ours[-1]["output_token_throughput"], theirs[-1]["output_token_throughput"]
    prefix = "prefix_" if workload == "shared-prefix" else ""
    lines.append(
        f"vs_llama_server_{prefix}rate={ratio(ours_rate, theirs_rate):.2f} "
        f"vs_llama_server_{prefix}throughput={ratio(top_ours, top_theirs):.2f}"
    )
    return lines


def print_table(rate: float, ours: dict, theirs: dict) -> None:
    print(f"rate {rate:g} req/s")
    print("| server | " + " | ".join(name for name, _ in TABLE_KEYS) + " |")
    print("| --- " * (len(TABLE_KEYS) + 1) + "|")
    for name, row in (("ours", ours), ("llama-server", theirs)):
        cells = [f"{row[k]:.0f}" if k == "failed" else f"{row[k]:.1f}" for _, k in TABLE_KEYS]
        print(f"| {name} | " + " | ".join(cells) + " |")
