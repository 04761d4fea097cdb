"""`make run`'s launcher stops every service it started on SIGINT and SIGTERM alike, and its
services do not outlive a launcher that is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # it may be reaped between the two looks: then it is gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_service_outlives_the_launcher(sig, tmp_path):
    env = {**os.environ, "COMPUTE_MODEL": "dummy:tiny", "COMPUTE_KV_BUDGET_TOKENS": "1024"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "deploy.run_local", "--free-ports", "--demo-prompt", ""],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # as `make run &`
    try:
        for line in launcher.stderr:
            if "all services SERVING" in line:
                break
        services = children(launcher.pid)
        assert len(services) == 3 and all(alive(p) for p in services)
        launcher.send_signal(sig)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in services) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in services), f"still running after {sig.name}"
        launcher.wait(timeout=10)
        if sig != signal.SIGKILL:
            assert launcher.returncode == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
