"""`make run`: memory, compute and gateway as separate local processes on loopback.

Starts them in dependency order, waits until each answers SERVING on grpc.health.v1, streams a
demo generation through `python -m gateway.client`, then keeps serving until Ctrl-C or SIGTERM.
Any failure, Ctrl-C or SIGTERM stops every process it started, gateway first (each drains and
exits 0); if the launcher is killed outright, the services get SIGTERM from the kernel
(deploy/with_parent.py): no orphans either way.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_auth import write_new_token
from common.settings import env_name
from deploy.services import ENV_PREFIXES, ServiceSpec, free_ports, local_services
from gateway.auth import read_keys
from gateway.client import gateway_channel


def gateway_setting(spec: ServiceSpec, name: str) -> str:
    """A gateway setting as the started process sees it: the spec's value, else its environment variable."""
    if name in spec.settings:
        return spec.settings[name]
    return os.environ.get(env_name(ENV_PREFIXES["gateway"], name), "")


def demo_client(gateway: ServiceSpec, prompt: str) -> tuple[list[str], dict[str, str]]:
    """The `gateway.client` command line and environment for the demo generation against this
    gateway, so it works with keys and TLS on: the gateway's certificate as the CA (a self-signed
    one verifies itself) and its first API key in $OPENAI_API_KEY, not on the command line, where
    `ps` and a failed command's message would show it."""
    keys = read_keys(gateway_setting(gateway, "api_keys_file"), gateway_setting(gateway, "api_keys"))
    cert = gateway_setting(gateway, "tls_cert_file")
    command = [
        sys.executable,
        "-m",
        "gateway.client",
        prompt,
        "--max-new-tokens",
        "48",
        "--temperature",
        "0.8",
        "--seed",
        "1",
        "--address",
        f"127.0.0.1:{gateway.port}",
        *(["--tls-ca", cert] if cert else []),
    ]
    env = {**os.environ, "OPENAI_API_KEY": keys[0].key if keys else ""}
    return command, env


def wait_serving(port: int, service: str, timeout_s: float, proc: subprocess.Popen, tls_ca_file: str = "") -> None:
    """Poll grpc.health.v1 until `service` is SERVING. Over TLS the certificate must name
    127.0.0.1 (the address polled); the timeout's message carries the last error, which says so."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    with gateway_channel(f"127.0.0.1:{port}", tls_ca_file) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with code {proc.returncode} before it was SERVING")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            except grpc.RpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
            time.sleep(0.2)
    raise TimeoutError(f"{service} on port {port} not SERVING after {timeout_s:.0f}s (last: {last_error})")


def start_service(spec: ServiceSpec, log_dir: str | None = None) -> subprocess.Popen:
    """One service as a child process in its own session, tied to the life of the thread that
    starts it (Linux's parent-death signal follows the creating thread: start services from a
    thread that lives as long as they should)."""
    env = {
        **os.environ,
        **spec.environment(host="127.0.0.1"),
        "PYTHONUNBUFFERED": "1",
        "LAUNCHER_PID": str(os.getpid()),
    }
    out = open(os.path.join(log_dir, f"{spec.name}.log"), "a") if log_dir else None
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.with_parent", spec.module],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
    )


def start_serving(spec: ServiceSpec, log_dir: str | None = None, timeout_s: float = 600) -> subprocess.Popen:
    """start_service, then wait until it answers SERVING."""
    proc = start_service(spec, log_dir)
    tls_ca_file = gateway_setting(spec, "tls_cert_file") if spec.role == "gateway" else ""  # internal ports: plaintext
    wait_serving(spec.port, spec.health_service, timeout_s, proc, tls_ca_file)
    return proc


def stop_service(proc: subprocess.Popen, timeout_s: float = 45) -> None:
    """SIGTERM (the service drains and exits), SIGKILL if it has not exited in `timeout_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def running_stack(services: list[ServiceSpec], timeout_s: float = 600, log_dir: str | None = None):
    """Start every service, wait for SERVING, yield the processes; always stops them all."""
    procs: list[subprocess.Popen] = []
    try:
        for spec in services:
            procs.append(start_serving(spec, log_dir, timeout_s))
            print(f"[run] {spec.name} SERVING on 127.0.0.1:{spec.port}", file=sys.stderr)
        yield procs
    finally:
        for proc in reversed(procs):  # one at a time, gateway first: a replica drains while memory still serves
            stop_service(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-prompt", default="ROMEO:", help="empty = no demo generation")
    ap.add_argument("--no-wait", action="store_true", help="stop after the demo instead of serving until Ctrl-C")
    ap.add_argument("--free-ports", action="store_true", help="any free loopback ports instead of 50050-50052")
    args = ap.parse_args(argv)

    def interrupt(*_):  # SIGINT and SIGTERM alike (a background job starts with SIGINT ignored)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    # The internal token (common/grpc_auth.py): fresh for each run, readable by this user alone,
    # gone when the run ends. The services check it on every internal call and the block map.
    token_dir = tempfile.TemporaryDirectory(prefix="paged-nanogpt-")
    token_file = os.path.join(token_dir.name, "internal_token")
    token = write_new_token(token_file)
    if args.free_ports:
        services = local_services_on_free_ports(token_file)
    else:
        services = local_services(internal_token_file=token_file)
    gateway = next(s for s in services if s.role == "gateway")
    memory = next(s for s in services if s.role == "memory")
    try:
        with token_dir, running_stack(services):
            print("[run] all services SERVING", file=sys.stderr)
            if args.demo_prompt:
                command, env = demo_client(gateway, args.demo_prompt)
                subprocess.run(command, env=env, check=True)
            if not args.no_wait:
                scheme = "https" if gateway_setting(gateway, "tls_cert_file") else "http"
                print(
                    f"\n[run] gateway on 127.0.0.1:{gateway.port} (gRPC), {scheme}://127.0.0.1:"
                    f"{gateway.settings['http_port']}/v1 (OpenAI API), metrics :{gateway.settings['metrics_port']}. "
                    "Ctrl-C stops everything.",
                    file=sys.stderr,
                )
                page_port = memory.settings.get("http_port", "0")
                if page_port != "0":  # the token is this run's, shown to the user who started it
                    print(f"[run] block map: http://127.0.0.1:{page_port}/?token={token}", file=sys.stderr)
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"[run] failed: {exc}", file=sys.stderr)
        return 1
    return 0


def local_services_on_free_ports(internal_token_file: str = "") -> list[ServiceSpec]:
    memory, compute, gateway, gateway_metrics, memory_metrics, http = free_ports(6)
    return local_services(
        memory,
        (compute,),
        gateway,
        gateway_metrics,
        memory_metrics,
        gateway_http_port=http,
        internal_token_file=internal_token_file,
    )


if __name__ == "__main__":
    sys.exit(main())
