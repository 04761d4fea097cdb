"""Faults change no token a client receives: a compute replica killed or paused mid-stream, the
memory service killed and restarted, a replica drained. Real processes on loopback (memory, two
compute replicas, gateway); every stream is compared with the in-process engine's tokens and text
for the same requests (greedy, seeded sampling, a request of n = 2 samples)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.local_engine import LocalEngine
from common.protocol import constraint_from_proto
from common.sampling_params import SamplingParams
from deploy.run_local import running_stack, start_serving
from deploy.services import free_ports, local_services
from gateway.client import stream_generate
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc, memory_pb2, memory_pb2_grpc
from rpc.v1 import gateway_pb2_grpc, generate_pb2

DIGITS_SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 80,
    "maxItems": 80,
}
DIGITS = json.dumps(DIGITS_SCHEMA)
LEASE_S = 1.5
COMPUTE = {"model": "dummy:tiny", "kv_budget_tokens": "4096", "max_num_seqs": "32"}
GATEWAY = {"health_poll_s": "0.2", "replica_down_after_s": "1.0", "replica_wait_s": "30"}
PARAMS = [
    dict(max_new_tokens=500, temperature=0, ignore_eos=True),
    dict(max_new_tokens=500, temperature=0.9, top_k=50, seed=7, ignore_eos=True),
    dict(max_new_tokens=500, temperature=1.0, seed=3, ignore_eos=True),
    dict(max_new_tokens=500, temperature=0.8, seed=11, n=2, ignore_eos=True),
    # Structured output: a JSON array long enough to be mid-stream at the fault (its matcher is
    # rebuilt on the next replica from the tokens so far).
    dict(
        max_new_tokens=500, temperature=0.9, seed=5, structured_output=generate_pb2.StructuredOutput(json_schema=DIGITS)
    ),
]
PROMPTS = [f"Fault number {i} tells" for i in range(6)]


def requests():
    return [(p, PARAMS[i % len(PARAMS)]) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def expected():
    engine = LocalEngine(model="dummy:tiny", kv_budget_tokens=4096)
    params = [SamplingParams(**{**kw, **structured(kw)}) for _, kw in requests()]
    results = engine.generate([p for p, _ in requests()], params)
    return [[(s.token_ids, s.text) for s in (r.samples or [r])] for r in results]


def structured(kw: dict) -> dict:
    """The public proto's StructuredOutput as the engine's Constraint."""
    return {"structured_output": constraint_from_proto(kw["structured_output"])} if "structured_output" in kw else {}


@contextmanager
def fault_stack(tmp_path, compute=COMPUTE, memory_settings=None):
    ports = free_ports(7)
    services = local_services(
        ports[0],
        (ports[1], ports[2]),
        ports[3],
        ports[4],
        ports[5],
        compute_settings=compute,
        gateway_http_port=ports[6],
    )
    services[0].settings.update({"lease_ttl_s": str(LEASE_S), **(memory_settings or {})})
    services[-1].settings.update(GATEWAY)
    with running_stack(services, timeout_s=120, log_dir=str(tmp_path)) as procs:
        yield dict(
            services=services,
            procs=procs,
            gateway=f"127.0.0.1:{ports[3]}",
            memory=f"127.0.0.1:{ports[0]}",
            computes=[f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}"],
            log_dir=str(tmp_path),
        )


class Streams:
    """The requests streamed concurrently through the gateway, each recording what it received
    (per sample: tokens, text, and the Complete that ended it)."""

    def __init__(self, gateway: str) -> None:
        samples = [params.get("n", 1) for _, params in requests()]
        self.tokens = [[[] for _ in range(n)] for n in samples]
        self.text = [["" for _ in range(n)] for n in samples]
        self.completes = [[None] * n for n in samples]
        self.pool = ThreadPoolExecutor(len(PROMPTS))
        self.futures = [self.pool.submit(self._one, i, gateway) for i in range(len(PROMPTS))]

    def _one(self, i: int, gateway: str) -> None:
        prompt, params = requests()[i]
        for response in stream_generate(gateway, prompt, timeout_s=120, **params):
            if response.HasField("chunk"):
                self.tokens[i][response.chunk.index].extend(response.chunk.token_ids)
                self.text[i][response.chunk.index] += response.chunk.text
            else:
                self.completes[i][response.complete.index] = response.complete

    @property
    def complete(self) -> list:
        return [c for request in self.completes for c in request]

    def wait_for_tokens(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while min(len(t) for request in self.tokens for t in request) < n:
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.01)

    def results(self) -> list:
        for future in self.futures:
            future.result(timeout=120)  # raises what a client saw
        self.pool.shutdown()
        return [list(zip(tokens, text, strict=False)) for tokens, text in zip(self.tokens, self.text, strict=False)]


def pools(memory: str) -> list:
    with grpc.insecure_channel(memory) as channel:
        return list(memory_pb2_grpc.MemoryServiceStub(channel).Stats(memory_pb2.StatsRequest(), timeout=5).pools)


def health(address: str, service: str = "rpc.internal.v1.ComputeService") -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def eventually(condition, timeout_s: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def replica_load(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        info = compute_pb2_grpc.ComputeServiceStub(channel).Info(compute_pb2.InfoRequest(), timeout=5)
    return info.num_running, info.num_waiting


def all_blocks_free(memory: str, num_pools: int) -> bool:
    found = pools(memory)
    return len(found) == num_pools and all(p.num_used_blocks == 0 and p.num_sequences == 0 for p in found)


def test_a_replica_killed_mid_stream_changes_no_token_and_its_blocks_come_back(tmp_path, expected):
    with fault_stack(tmp_path) as stack:
        streams = Streams(stack["gateway"])
        streams.wait_for_tokens(30)
        os.killpg(stack["procs"][1].pid, signal.SIGKILL)
        results = streams.results()
        assert results == expected
        constrained = [r for (_, kw), r in zip(requests(), results, strict=True) if "structured_output" in kw]
        assert constrained and all(
            jsonschema.validate(json.loads(text), DIGITS_SCHEMA) is None for ((_, text),) in constrained
        )
        migrated = [c for c in streams.complete if c.num_migrations]
        assert migrated and all(c.replica == "compute-1" for c in migrated)
        # The dead replica's pool held blocks; its lease runs out and they are freed.
        eventually(lambda: all_blocks_free(stack["memory"], 1), what="the dead replica's pool to expire")


def test_the_memory_service_killed_and_restarted_changes_no_token(tmp_path, expected):
    with fault_stack(tmp_path) as stack:
        streams = Streams(stack["gateway"])
        streams.wait_for_tokens(30)
        memory_proc = stack["procs"][0]
        os.killpg(memory_proc.pid, signal.SIGKILL)
        memory_proc.wait()
        eventually(
            lambda: all(health(c) == "NOT_SERVING" for c in stack["computes"]), 10, "the replicas to report NOT_SERVING"
        )
        # A request that arrives during the outage waits for a SERVING replica (replica_wait_s).
        late = ThreadPoolExecutor(1).submit(
            lambda: (
                [
                    r
                    for r in stream_generate(stack["gateway"], PROMPTS[0], timeout_s=60, **PARAMS[0])
                    if r.HasField("complete")
                ][0].complete
            )
        )
        time.sleep(0.5)
        stack["procs"][0] = start_serving(stack["services"][0], stack["log_dir"], 30)
        assert streams.results() == expected
        assert late.result(timeout=60).completion_tokens == 500
        eventually(lambda: all(health(c) == "SERVING" for c in stack["computes"]), 10, "SERVING again")
        eventually(lambda: all_blocks_free(stack["memory"], 2), what="both replicas registered, nothing held")


def test_a_replica_paused_past_its_lease_is_fenced_and_its_streams_continue_elsewhere(tmp_path, expected):
    with fault_stack(tmp_path) as stack:
        streams = Streams(stack["gateway"])
        streams.wait_for_tokens(30)
        paused = stack["procs"][1]
        os.killpg(paused.pid, signal.SIGSTOP)
        try:
            eventually(
                lambda: [p.replica for p in pools(stack["memory"])] == ["compute-1"],
                10,
                "the paused replica's lease to run out",
            )
            time.sleep(LEASE_S)
        finally:
            os.killpg(paused.pid, signal.SIGCONT)
        assert streams.results() == expected
        # Back from the pause, its late step was refused: it registered a new pool and serves again.
        eventually(
            lambda: sorted(p.replica for p in pools(stack["memory"])) == ["compute-0", "compute-1"],
            what="the paused replica to register again",
        )
        eventually(lambda: health(stack["computes"][0]) == "SERVING", what="the paused replica to serve again")
        log = open(os.path.join(stack["log_dir"], "compute-0.log")).read()
        assert "expired" in log and "registered again" in log
        eventually(lambda: all_blocks_free(stack["memory"], 2), what="nothing held")


@pytest.mark.parametrize("drain_timeout_s, moved", [("30", False), ("0.5", True)])
def test_a_drained_replica_finishes_or_hands_over_its_streams_and_exits_0(tmp_path, expected, drain_timeout_s, moved):
    compute = {**COMPUTE, "drain_timeout_s": drain_timeout_s}
    with fault_stack(tmp_path, compute=compute) as stack:
        streams = Streams(stack["gateway"])
        streams.wait_for_tokens(30)
        drained = stack["procs"][1]
        os.killpg(drained.pid, signal.SIGTERM)
        assert streams.results() == expected
        assert drained.wait(timeout=60) == 0
        assert any(c.num_migrations for c in streams.complete) == moved
        assert [p.replica for p in pools(stack["memory"])] == ["compute-1"]  # released, not left to expire


def test_the_lease_is_renewed_off_the_engine_thread_during_a_long_prefill(tmp_path):
    """Lease 1 s; one prefill step of four 1000-token prompts on GPT-2-small takes seconds here."""
    compute = {"model": "dummy:gpt2", "kv_budget_tokens": "8192", "max_num_batched_tokens": "4096"}
    with fault_stack(tmp_path, compute=compute, memory_settings={"lease_ttl_s": "1.0"}) as stack:
        before = sorted(p.pool_id for p in pools(stack["memory"]))
        prompts = [[(7 * i + j) % 50000 for j in range(1000)] for i in range(8)]
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            done = list(
                pool.map(lambda p: list(stream_generate(stack["gateway"], p, max_new_tokens=2, temperature=0)), prompts)
            )
        assert time.monotonic() - started > 2.0, "the prefill was meant to outlast the lease"
        assert all(d[-1].complete.finish_reason == "length" and not d[-1].complete.num_preemptions for d in done)
        assert sorted(p.pool_id for p in pools(stack["memory"])) == before  # no pool expired or re-registered


def test_overload_tries_a_replica_with_room_then_answers_resource_exhausted_at_once(tmp_path):
    """Each replica takes 2 running + 1 waiting requests. compute-0 is filled behind the gateway's
    back; the gateway, which would pick compute-0 first, must place 3 requests on compute-1 (trying
    the other replica when one says it is full); a 7th finds both full: RESOURCE_EXHAUSTED at once."""
    compute = {**COMPUTE, "max_num_seqs": "2", "max_waiting": "1"}
    params = dict(max_new_tokens=1000, temperature=0, ignore_eos=True)  # about 2 s of decoding here
    internal_params = compute_pb2.SamplingParams(**params)
    public = generate_pb2.GenerateRequest(text=b"busy", params=generate_pb2.SamplingParams(**params))
    with (
        fault_stack(tmp_path, compute=compute) as stack,
        grpc.insecure_channel(stack["gateway"]) as channel,
        grpc.insecure_channel(stack["computes"][0]) as direct,
    ):
        filler = compute_pb2_grpc.ComputeServiceStub(direct)
        calls = [
            filler.Generate(
                compute_pb2.GenerateRequest(request_id=f"fill-{i}", prompt_token_ids=[1, 2, 3], params=internal_params),
                timeout=60,
            )
            for i in range(3)
        ]
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            eventually(lambda: replica_load(stack["computes"][0]) == (2, 1), 10, "compute-0 to be full")
            calls += [stub.Generate(public, timeout=60) for _ in range(3)]
            eventually(lambda: replica_load(stack["computes"][1]) == (2, 1), 10, "compute-1 to take all three")
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(public, timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 1.0, "an overloaded stack must say so at once"
        finally:
            for call in calls:
                call.cancel()


def test_a_drained_gateway_lets_its_streams_finish_and_exits_0(tmp_path, expected):
    with fault_stack(tmp_path) as stack:
        streams = Streams(stack["gateway"])
        streams.wait_for_tokens(30)
        gateway = stack["procs"][-1]
        os.killpg(gateway.pid, signal.SIGTERM)
        eventually(lambda: health(stack["gateway"], "rpc.v1.Gateway") != "SERVING", 5, "the gateway to leave rotation")
        assert streams.results() == expected
        assert gateway.wait(timeout=30) == 0
