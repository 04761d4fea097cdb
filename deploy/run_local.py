"""`make run`: memory, compute and gateway as separate local processes on loopback.

Starts them in dependency order, waits until each answers SERVING on grpc.health.v1, streams a
demo generation through `python -m gateway.client`, then keeps serving until Ctrl-C. Any
failure, or Ctrl-C, stops every process it started (no orphans).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.services import ServiceSpec, local_services


def wait_serving(port: int, service: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} before it was SERVING")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{service} on port {port} not SERVING after {timeout_s:.0f}s")


@contextmanager
def running_stack(services: list[ServiceSpec], timeout_s: float = 600, log_dir: str | None = None):
    """Start every service, wait for SERVING, yield the processes; always stops them all."""
    procs: list[subprocess.Popen] = []
    try:
        for spec in services:
            env = {**os.environ, **spec.environment(host="127.0.0.1"), "PYTHONUNBUFFERED": "1"}
            out = open(os.path.join(log_dir, f"{spec.name}.log"), "w") if log_dir else None
            procs.append(subprocess.Popen([sys.executable, "-m", spec.module], env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None, start_new_session=True))
            wait_serving(spec.port, spec.health_service, timeout_s, procs[-1])
            print(f"[run] {spec.name} SERVING on 127.0.0.1:{spec.port}", file=sys.stderr)
        yield procs
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-prompt", default="ROMEO:")
    ap.add_argument("--no-wait", action="store_true", help="stop after the demo instead of serving until Ctrl-C")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with running_stack(local_services()):
            print("[run] all services SERVING; demo generation:", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "gateway.client", args.demo_prompt, "--max-new-tokens", "48",
                            "--temperature", "0.8", "--seed", "1"], check=True)
            if not args.no_wait:
                print("\n[run] gateway on 127.0.0.1:50050 (metrics :9100). Ctrl-C stops everything.", file=sys.stderr)
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"[run] failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
