"""The results notebook runs headless on a small CSV written by the benchmark's own writer."""

import argparse
from pathlib import Path

import pytest

from bench.benchmark import write_rows
from bench.serve import write_row

NOTEBOOK = Path(__file__).resolve().parent.parent / "bench" / "benchmark_results_viz.ipynb"


def test_notebook_executes_and_draws_every_figure(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    args = argparse.Namespace(model="dummy:tiny", device="cpu", dtype="float32")
    csv = tmp_path / "results.csv"
    for _ in range(2):
        write_rows(
            [
                dict(
                    mode=m, new_tokens=n, avg_seconds=s, tokens_per_second=n / s, speedup_vs_no_cache=sp, concurrency=1
                )
                for m, s, sp in [("paged", 1.0, 8.0), ("contiguous", 1.1, 7.3), ("no-cache", 8.0, 1.0)]
                for n in (100, 500)
            ],
            args,
            csv,
        )
    write_rows(
        [
            dict(
                mode=m,
                workload="sharegpt-synth",
                num_requests=64,
                kv_budget_tokens=4096,
                output_tokens_per_second=t,
                peak_concurrent_seqs=c,
                kv_utilization=u,
            )
            for m, t, c, u in [
                ("paged", 300.0, 20, 0.98),
                ("contiguous", 100.0, 4, 0.3),
                ("hf-generate", 90.0, 20, None),
            ]
        ],
        args,
        csv,
    )
    serving = tmp_path / "serving.csv"
    for mode, slope in (("paged", 1.0), ("contiguous", 3.0)):
        for rate in (0.05, 0.1, 0.2, float("inf")):
            write_row(
                dict(
                    timestamp_utc="2026-11-25T00:00:00+00:00",
                    mode=mode,
                    num_requests=8,
                    request_rate=rate,
                    completed=8,
                    request_throughput=rate,
                    output_token_throughput=50.0,
                    mean_normalized_latency_ms=100 * (1 + slope * min(rate, 1)),
                    **{f"{s}_{m}_ms": 10.0 for s in ("median", "p99") for m in ("ttft", "tpot")},
                ),
                serving,
            )
    for policy, hits in (("round-robin", 0.4), ("kv-aware", 0.78)):  # routing runs share the CSV (new columns)
        for rate in (0.5, 1.0, 2.0):
            write_row(
                dict(
                    timestamp_utc="2026-11-28T00:00:00+00:00",
                    mode="paged",
                    workload="shared-prefix",
                    num_requests=8,
                    request_rate=rate,
                    completed=8,
                    replicas=2,
                    routing=policy,
                    mean_normalized_latency_ms=100 * (1 + rate),
                    prefix_hit_rate=hits,
                    requests_per_replica="4/4",
                    **{f"{s}_{m}_ms": 10.0 * rate for s in ("median", "p99") for m in ("ttft", "tpot")},
                ),
                serving,
            )
    history = tmp_path / "locust_stats_history.csv"  # locust's own column names
    lines = ["Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,99%,Total Request Count"]
    for t in range(3):
        lines += [
            f"{1000 + t},4,grpc,Generate,0.5,0,{900 + t},{1500 + t},{t}",
            f"{1000 + t},4,grpc,Generate TTFT,0.5,0,{'N/A' if t == 0 else 40 + t},{80 + t},{t}",
            f"{1000 + t},4,,Aggregated,1.0,0,{400 + t},{1500 + t},{2 * t}",
        ]
    history.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SERVING_CSV", str(serving))
    monkeypatch.setenv("LOCUST_CSV", str(history))
    monkeypatch.setenv("BENCH_CSV", str(csv))
    monkeypatch.setenv("BENCH_FIG_DIR", str(tmp_path / "figs"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    figures = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert figures == [
        "concurrent_arms.png",
        "locust_over_time.png",
        "normalized_latency_vs_rate.png",
        "routing_ttft_vs_rate.png",
        "runtime_vs_tokens.png",
        "speedup_by_trial.png",
        "throughput_by_trial.png",
        "ttft_tpot_percentiles.png",
    ]
