"""A live stack for the HTTP front's tests: memory, one compute replica (dummy:tiny) and a gateway
with API keys (one from a keys file, one from the api_keys setting) and both listeners."""

from __future__ import annotations

import time
from contextlib import contextmanager

import grpc

from bench.isolation import gateway_metric
from deploy.run_local import running_stack
from deploy.services import free_ports, local_services
from gateway.client import auth_metadata
from rpc.v1 import gateway_pb2, gateway_pb2_grpc

FILE_KEY, ENV_KEY = "key-from-file", "key-from-setting"
COMPUTE = {"model": "dummy:tiny", "kv_budget_tokens": "4096", "max_num_seqs": "32"}


@contextmanager
def openai_stack(tmp_path, compute_settings: dict | None = None, **gateway_settings):
    """`compute_settings`: over COMPUTE (another model, a pool size)."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# one key a line\n{FILE_KEY}\n\n")
    memory, compute, gateway, m1, m2, http = free_ports(6)
    services = local_services(
        memory,
        (compute,),
        gateway,
        m1,
        m2,
        compute_settings={**COMPUTE, **(compute_settings or {})},
        gateway_http_port=http,
        gateway_settings={"api_keys_file": str(keys_file), "api_keys": ENV_KEY, **gateway_settings},
    )
    with running_stack(services, timeout_s=120, log_dir=str(tmp_path)) as procs:
        yield dict(
            grpc=f"127.0.0.1:{gateway}",
            http=f"http://127.0.0.1:{http}",
            memory=f"127.0.0.1:{memory}",
            metrics=f"http://127.0.0.1:{m1}",
            procs=procs,
            services=services,
        )


def grpc_stats(address: str, key: str = FILE_KEY) -> gateway_pb2.GatewayStats:
    with grpc.insecure_channel(address) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GetStats(
            gateway_pb2.StatsRequest(), timeout=10, metadata=auth_metadata(key)
        )


def cancelled_requests(metrics: str) -> float:
    """gateway_requests_total{status="CANCELLED"} from the metrics port's /metrics (0 before the first)."""
    return gateway_metric(metrics, 'gateway_requests_total{status="CANCELLED"}')


def wait_until_idle(address: str, timeout_s: float = 10.0) -> gateway_pb2.GatewayStats:
    """GetStats once nothing is in flight and every pool's blocks are free (AssertionError if not
    within timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = grpc_stats(address)
        idle = stats.requests_in_flight == 0 and all(
            p.num_used_blocks == 0 and p.num_sequences == 0 for p in stats.pools
        )
        if idle and stats.pools:
            return stats
        assert time.monotonic() < deadline, f"not idle after {timeout_s} s: {stats}"
        time.sleep(0.1)
