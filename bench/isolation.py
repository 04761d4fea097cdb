"""What the poison-request test and the fuzzer share: a stack with tight bounds, innocent greedy
streams that run beside the attack and are compared token by token with a run alone, and the
check that no block leaked.

An attack passes when every innocent run got exactly its reference tokens, no replica was marked
down or left by a migration, and once the stack is idle every pool's blocks are free.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import httpx

from common.block_hash import tenant_cache_salt
from deploy.run_local import running_stack
from deploy.services import free_ports, local_services
from gateway.auth import read_keys
from gateway.client import stream_generate
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

API_KEY = "isolation-test-key"
FAULT_SALT = "inject-a-row-fault"  # compute's fault_injection_salt in these stacks
# The innocents: greedy and seeded, n = 1 and 2, over both fronts (a poison must move none of them).
INNOCENTS = [("grpc", f"Innocent stream {i} keeps telling its story:", {"temperature": 0}) for i in range(5)] + [
    ("grpc", "Two innocent samples, seeded:", {"temperature": 0.8, "top_k": 50, "seed": 11, "n": 2}),
    ("http", "An innocent reader over HTTP:", {"temperature": 0}),
    ("http", "A seeded innocent over HTTP:", {"temperature": 0.9, "seed": 5}),
]
# Bounds tighter than the defaults, so that the timeouts are seen within a test.
GATEWAY_BOUNDS = {
    "http_header_timeout_s": "2",
    "http_body_timeout_s": "2",
    "stream_write_timeout_s": "2",
    "http_max_connections": "64",
    "max_request_s": "120",
}


@dataclass
class Stack:
    grpc: str
    http: str
    memory: str
    log_dir: str
    metrics: str  # the gateway's metrics port (with API keys the HTTP front serves no /metrics)


@contextmanager
def isolation_stack(log_dir: str, model: str = "dummy:tiny", replicas: int = 2, **gateway_settings):
    """Memory, `replicas` compute replicas (fault injection on: FAULT_SALT) and a gateway with an
    API key and GATEWAY_BOUNDS (overridden by `gateway_settings`), on free loopback ports."""
    ports = free_ports(5 + replicas)
    memory, gateway, m1, m2, http, *computes = ports
    # The replica sees the salt within the key's tenant (common/block_hash.py): inject on that one.
    tenant = read_keys(keys=API_KEY)[0].tenant
    compute = {
        "model": model,
        "kv_budget_tokens": "8192",
        "max_num_seqs": "32",
        "fault_injection_salt": tenant_cache_salt(tenant, FAULT_SALT),
    }
    services = local_services(
        memory,
        tuple(computes),
        gateway,
        m1,
        m2,
        compute_settings=compute,
        gateway_http_port=http,
        gateway_settings={"api_keys": API_KEY, **GATEWAY_BOUNDS, **gateway_settings},
    )
    os.makedirs(log_dir, exist_ok=True)
    with running_stack(services, timeout_s=180, log_dir=log_dir):
        yield Stack(
            f"127.0.0.1:{gateway}", f"http://127.0.0.1:{http}", f"127.0.0.1:{memory}", log_dir, f"http://127.0.0.1:{m1}"
        )


def reference_outputs(model: str, max_new_tokens: int) -> list[list[tuple[list[int], str]]]:
    """Each innocent's samples, (tokens, text) each, from the in-process engine: what the stack
    must stream whatever runs beside them (a sequence's logits are the same bits alone or in any
    batch, and every draw is seeded by its seed and position)."""
    from bench.local_engine import LocalEngine
    from common.sampling_params import SamplingParams

    engine = LocalEngine(model=model, kv_budget_tokens=8192)
    params = [SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **p) for _, _, p in INNOCENTS]
    results = engine.generate([prompt for _, prompt, _ in INNOCENTS], params)
    return [[(s.token_ids, s.text) for s in (r.samples or [r])] for r in results]


@dataclass
class Innocents:
    """The innocent streams, each repeated until `stop()`: every run is checked against its
    reference (gRPC: every sample's tokens; HTTP, streamed: every choice's text)."""

    stack: Stack
    expected: list[list[tuple[list[int], str]]]
    runs: int = 0
    broken: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(INNOCENTS))]

    def start(self) -> "Innocents":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> tuple[int, list[str]]:
        """Let every stream finish its current run; (runs completed, what broke)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)
        return self.runs, self.broken

    def _loop(self, i: int) -> None:
        front, prompt, params = INNOCENTS[i]
        want = self.expected[i]
        max_new_tokens = len(want[0][0])
        while not self._stop.is_set():
            error = ""
            try:
                if front == "grpc":
                    got = self._grpc(prompt, params, max_new_tokens, len(want))
                    ok = got == [tokens for tokens, _ in want]
                else:
                    got = self._http(prompt, params, max_new_tokens, len(want))
                    ok = got == [text for _, text in want]
            except (grpc.RpcError, httpx.HTTPError) as exc:
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                ok, error = False, f"{type(exc).__name__}: {details}"
            with self._lock:
                self.runs += 1
                if not ok:
                    self.broken.append(f"innocent {i} ({front}): {error or 'output differs from the run alone'}")

    def _grpc(self, prompt: str, params: dict, max_new_tokens: int, n: int) -> list[list[int]]:
        tokens: list[list[int]] = [[] for _ in range(n)]
        for response in stream_generate(
            self.stack.grpc,
            prompt,
            timeout_s=120,
            api_key=API_KEY,
            max_new_tokens=max_new_tokens,
            ignore_eos=True,
            **params,
        ):
            if response.HasField("chunk"):
                tokens[response.chunk.index] += response.chunk.token_ids
        return tokens

    def _http(self, prompt: str, params: dict, max_new_tokens: int, n: int) -> list[str]:
        texts = [""] * n
        body = {"prompt": prompt, "max_tokens": max_new_tokens, "ignore_eos": True, "stream": True, **params}
        with httpx.stream(
            "POST",
            f"{self.stack.http}/v1/completions",
            json=body,
            timeout=120,
            headers={"authorization": f"Bearer {API_KEY}"},
        ) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        raise httpx.HTTPError(f"error event: {event['error']}")
                    for choice in event["choices"]:
                        texts[choice["index"]] += choice["text"]
        return texts


def gateway_metric(metrics: str, sample: str) -> float:
    """One sample of the gateway's /metrics at `metrics` (its metrics port's URL), named as
    Prometheus prints it (with its labels, e.g. 'gateway_requests_total{status="CANCELLED"}'); 0
    before it is first counted."""
    for line in httpx.get(f"{metrics}/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def migrations(stack: Stack) -> float:
    return gateway_metric(stack.metrics, "gateway_migrations_total")


def leaked_blocks(stack: Stack, settle_s: float = 15.0) -> int:
    """Blocks still in use (and sequences still held) in any pool once nothing runs: waits up to
    `settle_s` for the last frees, then counts what is left."""
    deadline = time.monotonic() + settle_s
    with grpc.insecure_channel(stack.memory) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        while True:
            pools = stub.Stats(memory_pb2.StatsRequest(), timeout=10).pools
            used = sum(p.num_used_blocks + p.num_sequences for p in pools)
            if used == 0 or time.monotonic() > deadline:
                return used
            time.sleep(0.2)
