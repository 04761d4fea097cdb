"""`python -m deploy.with_parent MODULE`: run MODULE as __main__, but die with the launcher.

The launcher (`make run`, tests, benchmarks) starts each service in a session of its own, so a
Ctrl-C reaches the launcher alone and it stops the services in order. If the launcher itself is
killed outright (SIGKILL, a crash), Linux sends this process SIGTERM (PR_SET_PDEATHSIG), which
the services take as a request to drain and exit: no service outlives its launcher.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    module = sys.argv[1]
    launcher = int(os.environ.get("LAUNCHER_PID", "0"))
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if launcher and os.getppid() != launcher:  # it died before the line above took effect
            sys.exit(f"{module}: the launcher is gone")
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
