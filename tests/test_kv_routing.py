"""Discovery and routing on a live stack: memory, two compute replicas and two gateways (kv-aware
and round-robin, both discovering the replicas from the memory service) as real processes.
Routing never changes a token; kv-aware keeps a prefix where it is cached; replicas join when
SERVING and leave when their lease ends or they drain."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import urllib.request

import grpc
import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from deploy.run_local import running_stack, start_serving, stop_service
from deploy.services import free_ports, local_services
from gateway.client import stream_generate
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc
from rpc.v1 import gateway_pb2, gateway_pb2_grpc

COMPUTE = {"model": "dummy:tiny", "kv_budget_tokens": "4096", "max_num_seqs": "32"}
PARAMS = [
    dict(max_new_tokens=12, temperature=0, ignore_eos=True),
    dict(max_new_tokens=12, temperature=0.9, top_k=50, seed=5, ignore_eos=True),
    dict(max_new_tokens=12, temperature=0.8, seed=9, n=2, ignore_eos=True),
]
PREFIX = " ".join(f"word{i}" for i in range(40))  # well over 2 blocks of 16 tokens


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    memory, c1, c2, kv, rr, m1, m2, m3, h1, h2 = free_ports(10)
    services = local_services(
        memory,
        (c1, c2),
        kv,
        m1,
        m2,
        compute_settings=COMPUTE,
        gateway_http_port=h1,
        gateway_settings={"health_poll_s": "0.2", "discovery_poll_s": "0.2"},
    )
    services[0].settings["lease_ttl_s"] = "1.5"
    gateway = services[-1]
    services.append(
        dataclasses.replace(
            gateway,
            name="gateway-rr",
            port=rr,
            settings={**gateway.settings, "routing": "round-robin", "metrics_port": str(m3), "http_port": str(h2)},
        )
    )
    log_dir = str(tmp_path_factory.mktemp("logs"))
    with running_stack(services, timeout_s=120, log_dir=log_dir) as procs:
        yield dict(
            kv=f"127.0.0.1:{kv}",
            rr=f"127.0.0.1:{rr}",
            memory=f"127.0.0.1:{memory}",
            metrics=m1,
            compute_spec=services[1],
            log_dir=log_dir,
            procs=procs,
        )


def generate(address, prompt, **params):
    """Every sample's tokens, and its Complete, by index."""
    tokens, completes = {}, {}
    for r in stream_generate(address, prompt, timeout_s=60, **params):
        if r.HasField("chunk"):
            tokens.setdefault(r.chunk.index, []).extend(r.chunk.token_ids)
        else:
            completes[r.complete.index] = r.complete
    return [tokens.get(i, []) for i in sorted(completes)], [completes[i] for i in sorted(completes)]


def model_replicas(address):
    with grpc.insecure_channel(address) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(gateway_pb2.ModelInfoRequest(), timeout=5).replicas


def eventually(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - (deadline - timeout_s)


def test_the_same_tokens_whichever_replica_serves_and_whether_the_prefix_was_cached(stack):
    prompts = [f"{PREFIX} question {i}" for i in range(len(PARAMS))]
    engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=4096)
    expected = [
        [s.token_ids for s in (r.samples or [r])]
        for r in engine.generate(prompts, [SamplingParams(**kw) for kw in PARAMS])
    ]
    for prompt, params, want in zip(prompts, PARAMS, expected, strict=False):
        # Round-robin: the same request twice, on each replica in turn (neither has it cached).
        (a, done_a), (b, done_b) = generate(stack["rr"], prompt, **params), generate(stack["rr"], prompt, **params)
        assert {done_a[0].replica, done_b[0].replica} == {"compute-0", "compute-1"}
        assert a == b == want
        # kv-aware: a third time, on a replica that holds its prefix now, read from the cache.
        c, done_c = generate(stack["kv"], prompt, **params)
        assert c == want
        assert done_c[0].matched_tokens >= 32 and done_c[0].cached_tokens >= 32


def test_kv_aware_keeps_each_prefix_on_the_replica_that_holds_it(stack):
    groups = [f"Group {g} system prompt: " + " ".join(f"rule{g}-{i}" for i in range(30)) for g in range(4)]
    served: dict[int, list] = {}
    for i in range(4):
        for g, prefix in enumerate(groups):
            _, (done,) = generate(stack["kv"], f"{prefix} question {i}", max_new_tokens=4, temperature=0)
            served.setdefault(g, []).append(done)
    for g, completes in served.items():
        assert len({c.replica for c in completes}) == 1, f"group {g} was split: {[c.replica for c in completes]}"
        for later in completes[1:]:
            assert later.matched_tokens >= 48 and later.cached_tokens == later.matched_tokens
    assert {served[g][0].replica for g in served} == {"compute-0", "compute-1"}, "new prefixes spread over caches"
    with grpc.insecure_channel(stack["kv"]) as channel:
        stats = gateway_pb2_grpc.GatewayStub(channel).GetStats(gateway_pb2.StatsRequest(), timeout=5)
    assert stats.routing == "kv-aware" and len(stats.replicas) == 2
    assert all(r.requests_routed > 0 and r.prefix_hit_rate > 0.5 for r in stats.replicas)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack['metrics']}/metrics", timeout=5).read().decode()
    assert 'gateway_routing_decisions_total{policy="kv-aware"' in metrics
    assert "gateway_prefix_hit_rate{replica=" in metrics and "gateway_kv_match_ms_count" in metrics


def test_a_replica_joins_once_serving_and_leaves_when_its_lease_ends_or_it_drains(stack):
    memory_channel = grpc.insecure_channel(stack["memory"])
    memory = memory_pb2_grpc.MemoryServiceStub(memory_channel)
    listed = lambda: len(memory.ListReplicas(memory_pb2.ListReplicasRequest(), timeout=5).replicas)  # noqa: E731
    (port,) = free_ports(1)
    spec = stack["compute_spec"]
    spec = dataclasses.replace(spec, name="compute-2", port=port, settings={**spec.settings, "replica": "compute-2"})
    for leave in ("killed", "drained"):
        proc = start_serving(spec, stack["log_dir"], timeout_s=120)
        took = eventually(
            lambda: model_replicas(stack["kv"]) == 3 and model_replicas(stack["rr"]) == 3,
            10,
            "the gateways to discover the new replica",
        )
        assert took < 2.0, f"a SERVING replica took {took:.1f} s to be routed to"
        served = {generate(stack["rr"], f"join {leave} {i}", max_new_tokens=2)[1][0].replica for i in range(3)}
        assert "compute-2" in served
        if leave == "killed":  # no goodbye: its lease (1.5 s) ends, then it is dropped
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:  # SIGTERM: it withdraws its address at once, drains, releases its pool
            stop_service(proc)
        eventually(lambda: listed() == 2 and model_replicas(stack["kv"]) == 2, 10, f"the {leave} replica to leave")
        assert {generate(stack["kv"], f"after {leave}", max_new_tokens=2)[1][0].replica} <= {"compute-0", "compute-1"}
    memory_channel.close()
