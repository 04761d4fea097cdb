"""The serving benchmark over the HTTP front: `--backend openai-http` reports the same metrics as
gRPC, and `--backend both` ends with the machine-readable comparison line."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--workload",
    "fixed",
    "--num-requests",
    "4",
    "--new-tokens",
    "6",
    "--prompt-tokens",
    "20",
    "--model",
    "dummy:tiny",
    "--request-rate",
    "20",
]


def run_bench(tmp_path, *args) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "bench.serve", *SMALL, "--output", str(tmp_path / "rows.csv"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_openai_http_backend_reports_every_request_with_the_same_metrics_as_grpc(tmp_path):
    run_bench(tmp_path, "--backend", "grpc")
    run_bench(tmp_path, "--backend", "openai-http")
    grpc_row, http_row = list(csv.DictReader((tmp_path / "rows.csv").open()))
    assert (grpc_row["backend"], http_row["backend"]) == ("grpc", "openai-http")
    for row in (grpc_row, http_row):
        assert (row["completed"], row["failed"]) == ("4", "0")
        assert float(row["output_token_throughput"]) > 0
        assert 0 < float(row["median_ttft_ms"]) < float(row["median_e2el_ms"]) and float(row["median_tpot_ms"]) > 0


def test_both_backends_end_with_the_comparison_line(tmp_path):
    last = run_bench(tmp_path, "--backend", "both").strip().splitlines()[-1]
    found = re.fullmatch(
        r"http_ttft_delta_ms=(-?\d+\.\d+) http_ttft_paired_median_ms=(-?\d+\.\d+) http_tpot_ratio=(\d+\.\d+)", last
    )
    assert found, last
    assert float(found.group(3)) > 0
