"""Tenants, end to end through a live stack whose services authenticate each other: a key's tenant
owns its prefix-cache namespace, its request ids and its Abort; per-tenant limits refuse with a
retry hint and leave other tenants alone; per-tenant metrics count each."""

from __future__ import annotations

import hashlib
import threading

import grpc
import httpx
import pytest

from bench.isolation import gateway_metric
from common.grpc_auth import write_new_token
from deploy.run_local import running_stack
from deploy.services import free_ports, local_services
from gateway.client import auth_metadata
from rpc.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2

ALICE, BOB, CAROL, OLD = "sk-alice-0123", "sk-bob-4567", "sk-carol-89ab", "sk-old-format"
TENANT_MAX_IN_FLIGHT = 2
TENANT_TOKENS_PER_MINUTE = 2000
PROMPT = list(range(1000, 1064))  # 4 full blocks of 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.txt"
    keys.write_text(f"# key tenant\n{ALICE} alice\n{BOB} bob\n{CAROL} carol\n{OLD}\n")
    token = tmp / "internal_token"
    write_new_token(str(token))
    memory, compute, gateway, m1, m2, http = free_ports(6)
    services = local_services(
        memory,
        (compute,),
        gateway,
        m1,
        m2,
        compute_settings={"model": "dummy:tiny", "kv_budget_tokens": "8192", "max_num_seqs": "16"},
        gateway_http_port=http,
        gateway_settings={
            "api_keys_file": str(keys),
            "tenant_max_in_flight": str(TENANT_MAX_IN_FLIGHT),
            "tenant_tokens_per_minute": str(TENANT_TOKENS_PER_MINUTE),
        },
        internal_token_file=str(token),
    )
    with running_stack(services, timeout_s=120, log_dir=str(tmp)):
        with grpc.insecure_channel(f"127.0.0.1:{gateway}") as channel:
            yield dict(
                stub=gateway_pb2_grpc.GatewayStub(channel),
                http=f"http://127.0.0.1:{http}",
                metrics=f"http://127.0.0.1:{m1}",
            )


def request(prompt: list[int], max_new_tokens: int, request_id: str = "", **params) -> generate_pb2.GenerateRequest:
    message = generate_pb2.GenerateRequest(
        request_id=request_id,
        params=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **params),
    )
    message.token_ids.ids.extend(prompt)
    return message


def complete(stack, key: str, message: generate_pb2.GenerateRequest) -> generate_pb2.Complete:
    return stack["stub"].GenerateUnary(message, timeout=60, metadata=auth_metadata(key)).complete


def test_a_tenant_never_sees_another_tenants_cache(stack):
    first = complete(stack, ALICE, request(PROMPT, 2))
    again = complete(stack, ALICE, request(PROMPT, 2))
    assert first.cached_tokens == 0 and again.cached_tokens == 48  # the cache works within a tenant
    assert complete(stack, BOB, request(PROMPT, 2)).cached_tokens == 0
    assert complete(stack, OLD, request(PROMPT, 2)).cached_tokens == 0  # an old-format key: its own tenant
    # A salt a client picks cannot reach another tenant's namespace, and still splits its own.
    assert complete(stack, BOB, request(PROMPT, 2, cache_salt="")).cached_tokens == 48
    assert complete(stack, BOB, request(PROMPT, 2, cache_salt="bob-2")).cached_tokens == 0


def test_request_ids_and_abort_are_scoped_to_the_tenant(stack):
    alice = stack["stub"].Generate(request([5, 6, 7], 600, "shared-id"), timeout=60, metadata=auth_metadata(ALICE))
    assert next(alice).HasField("chunk")  # running
    # Bob cannot abort it, and learns nothing: the answer for an id nobody uses.
    with pytest.raises(grpc.RpcError) as refused:
        stack["stub"].Abort(gateway_pb2.AbortRequest(request_id="shared-id"), timeout=10, metadata=auth_metadata(BOB))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not in flight" in refused.value.details()
    # He may use the same id for his own request meanwhile: no ALREADY_EXISTS from the gateway or a replica.
    assert complete(stack, BOB, request([5, 6, 7], 3, "shared-id")).finish_reason == "length"
    done = [r.complete for r in alice if r.HasField("complete")]
    assert done[0].finish_reason == "length" and done[0].completion_tokens == 600
    # Alice can abort her own.
    alice = stack["stub"].Generate(request([5, 6, 7], 600, "mine"), timeout=60, metadata=auth_metadata(ALICE))
    next(alice)
    stack["stub"].Abort(gateway_pb2.AbortRequest(request_id="mine"), timeout=10, metadata=auth_metadata(ALICE))
    assert [r.complete.finish_reason for r in alice if r.HasField("complete")] == ["abort"]


def test_a_tenant_over_its_in_flight_limit_is_refused_and_others_are_not(stack):
    streams = [
        stack["stub"].Generate(request([9, 9, 9], 900), timeout=60, metadata=auth_metadata(CAROL))
        for _ in range(TENANT_MAX_IN_FLIGHT)
    ]
    for s in streams:
        assert next(s).HasField("chunk")  # both running
    with pytest.raises(grpc.RpcError) as refused:
        complete(stack, CAROL, request([1, 2], 1))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(refused.value.trailing_metadata())["retry-after"] == "1"
    # Over HTTP: 429 with Retry-After.
    answer = httpx.post(
        f"{stack['http']}/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"authorization": f"Bearer {CAROL}"},
        timeout=30,
    )
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1", answer.text
    assert complete(stack, ALICE, request([1, 2], 1)).finish_reason == "length"  # another tenant: unaffected
    for s in streams:
        for _ in s:
            pass
    assert complete(stack, CAROL, request([1, 2], 1)).finish_reason == "length"  # its slots are back
    assert gateway_metric(stack["metrics"], 'gateway_tenant_limited_total{limit="in_flight",tenant="carol"}') == 2


def test_a_tenant_over_its_tokens_per_minute_waits_and_others_do_not(stack):
    # A request that could never fit a minute's budget (3 x 900 + 3 tokens > 2000): no retry hint.
    with pytest.raises(grpc.RpcError) as never:
        complete(stack, BOB, request([1, 2, 3], 900, n=3))
    assert never.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_new_tokens" in never.value.details()
    assert "retry-after" not in dict(never.value.trailing_metadata())
    # Two requests of 903 tokens run to their length (nothing to refund); the third must wait.
    for _ in range(2):
        complete(stack, BOB, request([1, 2, 3], 900))
    with pytest.raises(grpc.RpcError) as wait:
        complete(stack, BOB, request([1, 2, 3], 900))
    assert wait.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in wait.value.details()
    assert int(dict(wait.value.trailing_metadata())["retry-after"]) >= 5  # hundreds of tokens at 33 a second
    assert complete(stack, ALICE, request([1, 2, 3], 900)).finish_reason == "length"  # her own budget
    assert gateway_metric(stack["metrics"], 'gateway_tenant_tokens_total{kind="completion",tenant="bob"}') >= 1800
    assert gateway_metric(stack["metrics"], 'gateway_tenant_limited_total{limit="tokens_per_minute",tenant="bob"}') == 2


def test_concurrent_tenants_with_equal_ids_do_not_collide(stack):
    """Two tenants' requests with one id, at once: both run to the end (the replica sees
    tenant-scoped ids)."""
    results: dict[str, str] = {}

    def run(key: str) -> None:
        results[key] = complete(stack, key, request([4, 4, 4], 200, "same")).finish_reason

    threads = [threading.Thread(target=run, args=(k,)) for k in (ALICE, OLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {ALICE: "length", OLD: "length"}


def test_a_request_id_is_bounded(stack):
    with pytest.raises(grpc.RpcError) as refused:
        complete(stack, ALICE, request([1, 2], 1, "x" * 257))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in refused.value.details()


def test_per_tenant_metrics_name_no_key_and_stay_off_the_public_port(stack):
    complete(stack, OLD, request([1, 2], 1))
    # A key alone is shown by its place among the unnamed keys, never by anything derived from it.
    assert gateway_metric(stack["metrics"], 'gateway_tenant_requests_total{status="OK",tenant="key-1"}') >= 1
    page = httpx.get(f"{stack['metrics']}/metrics", timeout=10).text
    assert hashlib.sha256(OLD.encode()).hexdigest()[:8] not in page
    assert httpx.get(f"{stack['http']}/metrics", timeout=10).status_code == 404
