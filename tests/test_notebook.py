"""The results notebook runs headless on a small CSV written by the benchmark's own writer."""
import argparse
from pathlib import Path

import pytest

from bench.benchmark import write_rows

NOTEBOOK = Path(__file__).resolve().parent.parent / "bench" / "benchmark_results_viz.ipynb"


def test_notebook_executes_and_draws_every_figure(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    args = argparse.Namespace(model="dummy:tiny", device="cpu", dtype="float32")
    csv = tmp_path / "results.csv"
    for trial in range(2):
        write_rows([
            dict(mode=m, new_tokens=n, avg_seconds=s, tokens_per_second=n / s, speedup_vs_no_cache=sp, concurrency=1)
            for m, s, sp in [("paged", 1.0, 8.0), ("contiguous", 1.1, 7.3), ("no-cache", 8.0, 1.0)]
            for n in (100, 500)
        ], args, csv)
    write_rows([
        dict(mode=m, workload="sharegpt-synth", num_requests=64, kv_budget_tokens=4096,
             output_tokens_per_second=t, peak_concurrent_seqs=c, kv_utilization=u)
        for m, t, c, u in [("paged", 300.0, 20, 0.98), ("contiguous", 100.0, 4, 0.3), ("hf-generate", 90.0, 20, None)]
    ], args, csv)
    monkeypatch.setenv("BENCH_CSV", str(csv))
    monkeypatch.setenv("BENCH_FIG_DIR", str(tmp_path / "figs"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    figures = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert figures == ["concurrent_arms.png", "runtime_vs_tokens.png", "speedup_by_trial.png", "throughput_by_trial.png"]
