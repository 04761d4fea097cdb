"""The internal services authenticate their callers and bound what a caller can make them hold;
every listener refuses to start open beyond loopback unless told to.

Real processes: a memory service and a compute replica with a shared token, called by a client
with no token, a wrong one and the right one."""

from __future__ import annotations

import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_auth import write_new_token
from deploy.run_local import running_stack, stop_service, wait_serving
from deploy.services import ServiceSpec, free_ports, local_services
from memory_service.pools import PoolLimitError, PoolLimits, PoolRegistry
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc, memory_pb2, memory_pb2_grpc

MAX_WATCHERS = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service-auth")
    token_file = tmp / "internal_token"
    token = write_new_token(str(token_file))
    memory, compute, gateway, m1, m2, http, page = free_ports(7)
    services = local_services(
        memory,
        (compute,),
        gateway,
        m1,
        m2,
        compute_settings={"model": "dummy:tiny", "kv_budget_tokens": "1024"},
        gateway_http_port=http,
        memory_http_port=page,
        internal_token_file=str(token_file),
    )
    services[0] = ServiceSpec(
        **{**services[0].__dict__, "settings": {**services[0].settings, "max_watchers": str(MAX_WATCHERS)}}
    )
    with running_stack(services[:2], timeout_s=120, log_dir=str(tmp)):
        yield dict(
            memory=f"127.0.0.1:{memory}", compute=f"127.0.0.1:{compute}", page=f"http://127.0.0.1:{page}", token=token
        )


def metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


CALLERS = {"none": [], "wrong": metadata("x" * 64)}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_memory_refuses_every_call_without_the_token(stack, caller):
    with grpc.insecure_channel(stack["memory"]) as channel:
        stub, md = memory_pb2_grpc.MemoryServiceStub(channel), CALLERS[caller]
        calls = {
            "RegisterPool": lambda: stub.RegisterPool(
                memory_pb2.RegisterPoolRequest(num_blocks=8, block_size=4, replica="intruder", address="evil:1"),
                timeout=10,
                metadata=md,
            ),
            "ListReplicas": lambda: stub.ListReplicas(memory_pb2.ListReplicasRequest(), timeout=10, metadata=md),
            "Match": lambda: stub.Match(memory_pb2.MatchRequest(), timeout=10, metadata=md),
            "Stats": lambda: stub.Stats(memory_pb2.StatsRequest(), timeout=10, metadata=md),
            "WatchEvents": lambda: next(stub.WatchEvents(memory_pb2.WatchEventsRequest(), timeout=10, metadata=md)),
            "StepStream": lambda: next(stub.StepStream(iter([memory_pb2.StepRequest()]), timeout=10, metadata=md)),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        # Health stays open: probes carry no token.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # Nothing the intruder tried was registered.
        listed = stub.ListReplicas(memory_pb2.ListReplicasRequest(), timeout=10, metadata=metadata(stack["token"]))
        assert "evil:1" not in [r.address for r in listed.replicas]


def test_compute_refuses_generate_without_the_token(stack):
    request = compute_pb2.GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3])
    request.params.max_new_tokens = 2
    with grpc.insecure_channel(stack["compute"]) as channel:
        stub = compute_pb2_grpc.ComputeServiceStub(channel)
        for md in CALLERS.values():
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, timeout=10, metadata=md))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.Generate(request, timeout=30, metadata=metadata(stack["token"])))
        assert replies[-1].complete.finish_reason == "length"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_block_map_page_needs_the_token(stack):
    page, token = stack["page"], stack["token"]
    for path in ("/", "/state", "/events"):
        assert httpx.get(page + path, timeout=10).status_code == 401, path
        assert httpx.get(page + path, timeout=10, headers={"authorization": "Bearer " + "x" * 64}).status_code == 401
    assert httpx.get(page + "/?token=" + "x" * 64, timeout=10).status_code == 401
    assert httpx.get(page + "/state", timeout=10, headers={"authorization": f"Bearer {token}"}).status_code == 200
    with httpx.Client(base_url=page, timeout=10) as browser:  # a browser's first visit: the token becomes a cookie
        first = browser.get(f"/?token={token}")
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert "httponly" in first.headers["set-cookie"].lower()
        assert token not in first.headers["set-cookie"], "the cookie must not carry the token that opens gRPC"
        assert browser.get("/state").status_code == 200 and "pools" in browser.get("/state").json()


def test_memory_bounds_what_a_caller_makes_it_hold(stack):
    md = metadata(stack["token"])
    with grpc.insecure_channel(stack["memory"]) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as huge:
            stub.RegisterPool(
                memory_pb2.RegisterPoolRequest(num_blocks=2**32 - 1, block_size=16, replica="big"),
                timeout=10,
                metadata=md,
            )
        assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_pool_blocks" in huge.value.details()
        ids = [
            stub.RegisterPool(
                memory_pb2.RegisterPoolRequest(num_blocks=8, block_size=4, replica="greedy"), timeout=10, metadata=md
            ).pool_id
            for _ in range(4)
        ]
        with pytest.raises(grpc.RpcError) as fifth:
            stub.RegisterPool(
                memory_pb2.RegisterPoolRequest(num_blocks=8, block_size=4, replica="greedy"), timeout=10, metadata=md
            )
        assert (
            fifth.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "max_pools_per_replica" in fifth.value.details()
        )
        for pool_id in ids:
            stub.ReleasePool(memory_pb2.ReleasePoolRequest(pool_id=pool_id), timeout=10, metadata=md)
        watchers = [
            stub.WatchEvents(memory_pb2.WatchEventsRequest(), timeout=30, metadata=md) for _ in range(MAX_WATCHERS)
        ]
        for w in watchers:
            next(w)  # subscribed
        with pytest.raises(grpc.RpcError) as third:
            next(stub.WatchEvents(memory_pb2.WatchEventsRequest(), timeout=10, metadata=md))
        assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            httpx.get(
                stack["page"] + "/events", timeout=10, headers={"authorization": f"Bearer {stack['token']}"}
            ).status_code
            == 503
        )
        for w in watchers:
            w.cancel()


@pytest.mark.parametrize(
    "module, needs",
    [
        ("gateway.server", "API keys"),
        ("memory_service.server", "--internal-token-file"),
        ("compute_service.server", "--internal-token-file"),
    ],
)
def test_a_service_beyond_loopback_with_no_credential_refuses_to_start(module, needs):
    port = free_ports(1)[0]
    result = subprocess.run(
        [sys.executable, "-m", module, "--host", "0.0.0.0", "--port", str(port)]
        + (["--metrics-port", "0", "--http-port", "0"] if module != "compute_service.server" else []),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "refusing to listen on '0.0.0.0' with no authentication" in result.stderr and needs in result.stderr
    assert "--allow-unauthenticated" in result.stderr


def test_allow_unauthenticated_is_an_explicit_choice(tmp_path):
    port = free_ports(1)[0]
    command = [sys.executable, "-m", "memory_service.server", "--host", "0.0.0.0", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--metrics-port", "0", "--http-port", "0", "--allow-unauthenticated", "true"], start_new_session=True
    )
    try:
        wait_serving(port, "rpc.internal.v1.MemoryService", 60, proc)  # on 0.0.0.0, which loopback reaches
    finally:
        stop_service(proc)


def test_a_gateway_published_beyond_loopback_refuses_to_start_open():
    """Compose listens on 0.0.0.0 in the container and publishes on a host address: that address decides."""
    port = free_ports(1)[0]
    command = [sys.executable, "-m", "gateway.server", "--port", str(port), "--metrics-port", "0", "--http-port", "0"]
    result = subprocess.run([*command, "--exposed-host", "192.0.2.7"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "refusing to listen on '192.0.2.7'" in result.stderr


def test_pool_limits_refuse_before_building_anything():
    registry = PoolRegistry(5.0, limits=PoolLimits(max_pool_blocks=64, max_pools=8, max_total_blocks=100))
    registry.register(64, 16, "a")
    with pytest.raises(PoolLimitError, match="100 blocks in all pools"):
        registry.register(64, 16, "b")
    with pytest.raises(PoolLimitError, match="at most 256 characters"):
        registry.register(4, 16, "r" * 257)
    with pytest.raises(PoolLimitError, match="at most 256 characters"):
        registry.advertise(registry.pools[next(iter(registry.pools))], "h" * 300)
    assert len(registry.pools) == 1
