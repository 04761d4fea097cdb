"""The single-stream benchmark's roofline: each timed run is set against the read bandwidth
probed just before and after it (a VM's bandwidth drifts between minutes), and the fractions it
prints are that run's tok/s over bytes-per-token / that bandwidth."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

from bench.local_engine import LocalEngine
from bench.roofline import roofline_tokens_per_second

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEW = 8, 24


def test_each_run_is_paired_with_the_bandwidth_probed_beside_it(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.benchmark",
            "--modes",
            "paged",
            "--model",
            "dummy:tiny",
            "--prompt-tokens",
            str(PROMPT),
            "--new-tokens",
            str(NEW),
            "--warmup",
            "0",
            "--runs",
            "3",
            "--roofline",
            "--output",
            str(tmp_path / "rows.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    paired = next(line for line in out.stdout.splitlines() if line.startswith("roofline, paired"))
    runs = re.findall(r"(\d+\.\d) tok/s at (\d+\.\d) GB/s = (\d+\.\d)%", paired)
    assert len(runs) == 3, paired
    model = LocalEngine(model="dummy:tiny", mode="no-cache").model
    fractions = []
    for tok_s, bandwidth, percent in runs:
        expected = float(tok_s) / roofline_tokens_per_second(model, 1, PROMPT + NEW // 2, float(bandwidth))
        rounding = expected * 100 * (0.05 / float(tok_s) + 0.05 / float(bandwidth)) + 0.051  # printed to 0.1
        assert abs(expected * 100 - float(percent)) <= rounding, (expected, percent)
        assert float(bandwidth) > 0.5  # a real probe pass, not the 0 of an unprobed run
        fractions.append(float(percent))
    median = float(re.search(r"median (\d+\.\d)%", paired).group(1))
    assert abs(median - statistics.median(fractions)) <= 0.05


def test_paired_fractions_use_each_runs_own_bandwidth(capsys, monkeypatch):
    """Two runs at the same speed, one beside a 10 GB/s probe and one beside 40: 4x apart,
    whatever the probe read at the end (here 25)."""
    from argparse import Namespace

    from bench import decode_speed
    from bench.decode_speed import single_stream_comparison

    monkeypatch.setattr(decode_speed, "read_bandwidth_gb_per_s", lambda: 25.0)
    engine = LocalEngine(model="dummy:tiny", mode="no-cache")
    args = Namespace(prompt_tokens=PROMPT, new_tokens=NEW, peers=[], runs=1, seed=0, model="dummy:tiny")
    single_stream_comparison(args, engine, 30.0, [(30.0, 10.0), (30.0, 40.0)])
    paired = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("roofline, paired"))
    slow, fast = (
        float(tok_s) / roofline_tokens_per_second(engine.model, 1, PROMPT + NEW // 2, bw)
        for tok_s, bw in ((30.0, 10.0), (30.0, 40.0))
    )
    assert [float(p) for p in re.findall(r"= (\d+(?:\.\d+)?)%", paired)] == [round(slow * 100, 1), round(fast * 100, 1)]
