"""Integration: memory, two compute replicas and the gateway as real processes on loopback."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from deploy.run_local import running_stack
from deploy.services import free_ports, local_services
from gateway.client import stream_generate
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc
from rpc.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2

COMPUTE_SETTINGS = {"model": "dummy:tiny", "kv_budget_tokens": "4096", "max_num_seqs": "32"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    memory, c1, c2, gateway, m1, m2, http = free_ports(7)
    services = local_services(
        memory, (c1, c2), gateway, m1, m2, compute_settings=COMPUTE_SETTINGS, gateway_http_port=http
    )
    services[-1].settings["max_in_flight"] = "20"
    with running_stack(services, timeout_s=120, log_dir=str(tmp_path_factory.mktemp("logs"))) as procs:
        yield dict(gateway=f"127.0.0.1:{gateway}", memory=f"127.0.0.1:{memory}", procs=procs)


def collect(address, prompt, **params):
    tokens, text, complete = [], [], None
    for r in stream_generate(address, prompt, **params):
        if r.HasField("chunk"):
            tokens.extend(r.chunk.token_ids)
            text.append(r.chunk.text)
        elif r.HasField("complete"):
            complete = r.complete
    return tokens, "".join(text), complete


def memory_pools(address):
    with grpc.insecure_channel(address) as ch:
        return memory_pb2_grpc.MemoryServiceStub(ch).Stats(memory_pb2.StatsRequest(), timeout=5).pools


def wait_all_blocks_free(address, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pools = memory_pools(address)
        if all(p.num_used_blocks == 0 and p.num_sequences == 0 for p in pools):
            return pools
        time.sleep(0.1)
    raise AssertionError(f"blocks still in use: {pools}")


def test_16_concurrent_streams_match_the_in_process_engine_and_both_replicas_serve(stack):
    prompts = [f"Request number {i} says" + " hello" * i for i in range(16)]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    expected = LocalEngine(model="dummy:tiny", kv_budget_tokens=4096).generate(prompts, params)
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(
                lambda p: collect(stack["gateway"], p, max_new_tokens=24, temperature=0.0, ignore_eos=True), prompts
            )
        )
    for (tokens, text, complete), want in zip(results, expected, strict=False):
        assert tokens == want.token_ids
        assert text == want.text
        assert complete.finish_reason == "length" and complete.completion_tokens == 24
        assert complete.timings.ttft_ms > 0 and complete.timings.e2e_ms >= complete.timings.ttft_ms
    assert {c.replica for _, _, c in results} == {"compute-0", "compute-1"}
    wait_all_blocks_free(stack["memory"])


def test_unary_generate_and_model_info_and_stats(stack):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        result = stub.GenerateUnary(
            generate_pb2.GenerateRequest(
                text=b"Hello", params=generate_pb2.SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
            )
        )
        assert len(result.token_ids) == 5 and result.complete.finish_reason == "length"
        info = stub.GetModelInfo(gateway_pb2.ModelInfoRequest())
        assert (info.model, info.context_length, info.block_size, info.replicas, info.vocab_size) == (
            "dummy:tiny",
            1024,
            16,
            2,
            50257,
        )
        stats = stub.GetStats(gateway_pb2.StatsRequest())
        assert stats.requests_total >= 1 and stats.ttft.p50_ms > 0 and len(stats.pools) == 2


BAD_REQUESTS = [
    (dict(text=b""), "prompt"),
    (dict(), "prompt"),
    (dict(text=b"\xff\xfe bad"), "UTF-8"),
    (dict(token_ids=generate_pb2.TokenIds(ids=[1] * 1024)), "prompt"),
    (dict(token_ids=generate_pb2.TokenIds(ids=[60000])), "token ids"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(max_new_tokens=5000)), "max_new_tokens"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(temperature=-1)), "temperature"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(temperature=math.nan)), "temperature"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(top_p=0)), "top_p"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(top_p=1.5)), "top_p"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(stop=[""])), "stop"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(stop=["a", "b", "c", "d", "e"])), "stop"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(stop=["x" * 65])), "stop"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(n=0)), "n must be"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(n=17)), "n must be"),
    (dict(text=b"hi", params=generate_pb2.SamplingParams(cache_salt="s" * 257)), "cache_salt"),
]


@pytest.mark.parametrize("fields, named", BAD_REQUESTS)
def test_bad_input_gets_invalid_argument_naming_the_field(stack, fields, named):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(generate_pb2.GenerateRequest(**fields), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()


def test_prefix_cache_hits_are_reported_per_request_and_per_pool(stack):
    """The same 60-token prompt four times: a replica that has served it before finds its 3 full
    blocks cached; Complete says so, and the pools' hit counters add up to the same tokens."""
    prompt = list(range(1000, 1060))
    before = sum(p.prefix_hit_tokens for p in memory_pools(stack["memory"]))
    cached = [collect(stack["gateway"], prompt, max_new_tokens=3, temperature=0)[2].cached_tokens for _ in range(4)]
    assert set(cached) <= {0, 48} and cached.count(48) >= 2, cached  # two replicas: each misses at most once
    pools = memory_pools(stack["memory"])
    assert sum(p.prefix_hit_tokens for p in pools) - before == sum(cached)
    assert all(0 <= p.prefix_hit_rate <= 1 for p in pools)


def test_n_samples_stream_with_their_index_and_equal_the_in_process_engine(stack):
    params = dict(max_new_tokens=12, temperature=0.9, seed=21, n=3, ignore_eos=True)
    expected = (
        LocalEngine(model="dummy:tiny", kv_budget_tokens=4096)
        .generate(["Three ways to say"], SamplingParams(**params))[0]
        .samples
    )
    with grpc.insecure_channel(stack["gateway"]) as ch:
        result = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            generate_pb2.GenerateRequest(text=b"Three ways to say", params=generate_pb2.SamplingParams(**params)),
            timeout=30,
        )
    assert [s.complete.index for s in result.samples] == [0, 1, 2]
    assert [list(s.token_ids) for s in result.samples] == [s.token_ids for s in expected]
    assert [s.text for s in result.samples] == [s.text for s in expected]
    assert list(result.token_ids) == expected[0].token_ids  # sample 0 in the top-level fields too
    assert not any(s.samples for s in result.samples)  # each sample once, not nested
    assert all(s.complete.seed == 21 and s.complete.completion_tokens == 12 for s in result.samples)
    wait_all_blocks_free(stack["memory"])


def test_abort_of_unknown_request_is_invalid_argument(stack):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(ch).Abort(gateway_pb2.AbortRequest(request_id="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()


def long_request(request_id: str = "") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=request_id,
        text=b"Once upon a time",
        params=generate_pb2.SamplingParams(max_new_tokens=1000, temperature=0, ignore_eos=True),
    )


def test_client_cancel_mid_stream_frees_every_block(stack):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(long_request())
        for i, _ in enumerate(call):
            if i == 3:
                break
        assert any(p.num_used_blocks > 0 for p in memory_pools(stack["memory"]))
        call.cancel()
    wait_all_blocks_free(stack["memory"])


def test_deadline_passing_frees_every_block(stack):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(long_request(), timeout=0.5)  # 1000 tokens take ~2 s here
        next(call)  # a first token: the request was admitted, so it holds blocks now
        assert any(p.num_used_blocks > 0 for p in memory_pools(stack["memory"]))
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_blocks_free(stack["memory"])


def test_abort_rpc_ends_the_stream_with_finish_reason_abort(stack):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        call = stub.Generate(long_request("to-abort"))
        responses = []
        for r in call:
            responses.append(r)
            if len(responses) == 2:
                stub.Abort(gateway_pb2.AbortRequest(request_id="to-abort"))
    assert responses[-1].complete.finish_reason == "abort"
    wait_all_blocks_free(stack["memory"])


def test_full_gateway_answers_resource_exhausted(stack):
    with grpc.insecure_channel(stack["gateway"]) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        calls = [stub.Generate(long_request()) for _ in range(20)]
        for c in calls:
            next(c)  # each is in flight
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request(), timeout=10))
        for c in calls:
            c.cancel()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_all_blocks_free(stack["memory"])


def test_dead_compute_replica_gives_unavailable(tmp_path):
    memory, compute, gateway, m1, m2, http = free_ports(6)
    services = local_services(
        memory, (compute,), gateway, m1, m2, compute_settings=COMPUTE_SETTINGS, gateway_http_port=http
    )
    services[-1].settings["replica_wait_s"] = "2"  # how long a request waits for a replica to come back
    with running_stack(services, timeout_s=120, log_dir=str(tmp_path)) as procs:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
        with pytest.raises(grpc.RpcError) as err:
            collect(f"127.0.0.1:{gateway}", "hi", max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


SERVICES = ("compute_service", "memory_service", "gateway")
TORCH_FREE = [
    ("memory_service.server", ("torch", "compute_service", "gateway")),
    ("gateway.server", ("torch", "compute_service", "memory_service")),
]
TORCH_FREE += [
    (f"common.{name}", ("torch", *SERVICES))
    for name in ("protocol", "sampling_params", "text_stream", "blocks", "tokenizer", "settings")
]


@pytest.mark.parametrize("module, forbidden", TORCH_FREE)
def test_torch_free_modules_import_neither_torch_nor_another_service(module, forbidden):
    """The memory service and the gateway run without torch (small images, fast starts), and
    common/ stays below every service: it imports none of them."""
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
