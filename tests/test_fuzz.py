"""The short run of the edge fuzzer (`python -m bench.fuzz --requests 300`): generated requests over
both fronts while innocent streams run, against a stack of its own. The goal run (10,000) is the
benchmark command in the README."""

from __future__ import annotations

import subprocess
import sys


def test_a_short_fuzz_run_finds_no_server_error_broken_stream_or_leak(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--requests", "300", "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert last.startswith("fuzz_requests=300 "), done.stdout[-3000:] + done.stderr[-3000:]
    assert last.endswith("server_errors=0 innocent_broken=0 leaked_blocks=0"), done.stdout[-3000:]
    assert done.returncode == 0
