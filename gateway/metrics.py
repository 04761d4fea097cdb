"""Per-request latency and throughput, by the definitions of vLLM's serving benchmark:
TTFT = first token - request received; E2E = last token - received; TPOT = (E2E - TTFT) /
(output tokens - 1); ITL = every gap between consecutive streamed chunks; queue = the engine's
arrival -> first scheduled step. Exported to Prometheus and summarised for GetStats."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
REQUESTS = Counter("gateway_requests_total", "Generate requests by final gRPC status", ["status"])
OUTPUT_TOKENS = Counter("gateway_output_tokens_total", "Tokens streamed to clients")
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Requests being served")
MIGRATIONS = Counter("gateway_migrations_total", "Requests continued on another replica after a fault")
ROUTED = Counter("gateway_routing_decisions_total", "Replicas chosen for an attempt, by policy", ["policy", "replica"])
PROMPT_TOKENS = Counter("gateway_prompt_tokens_total", "Prompt tokens of requests each replica finished", ["replica"])
CACHED_TOKENS = Counter("gateway_cached_prompt_tokens_total", "Of those, found in its prefix cache", ["replica"])
MATCHED_TOKENS = Counter(
    "gateway_matched_prompt_tokens_total", "Of those, held there when the router chose it", ["replica"]
)
HIT_RATE = Gauge("gateway_prefix_hit_rate", "Cached / prompt tokens of the requests each replica finished", ["replica"])
MATCH_MS = Histogram(
    "gateway_kv_match_ms",
    "Memory-service Match call (kv-aware routing)",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250),
)
MATCH_FAILURES = Counter("gateway_kv_match_failures_total", "Match calls that failed (routed on local state)")
# Per tenant (the API key's: gateway/auth.py); the label set is bounded by the configured keys.
TENANT_REQUESTS = Counter("gateway_tenant_requests_total", "Requests by tenant and final status", ["tenant", "status"])
TENANT_TOKENS = Counter("gateway_tenant_tokens_total", "Tokens by tenant: prompt and completion", ["tenant", "kind"])
TENANT_IN_FLIGHT = Gauge("gateway_tenant_requests_in_flight", "Requests being served, by tenant", ["tenant"])
TENANT_LIMITED = Counter("gateway_tenant_limited_total", "Requests refused by a per-tenant limit", ["tenant", "limit"])
_PER_REPLICA = (PROMPT_TOKENS, CACHED_TOKENS, MATCHED_TOKENS, HIT_RATE)


# Tenant -> its metrics label (gateway/auth.py: a key alone is shown as key-<n>, never by anything
# derived from the key); set once at start, as the Prometheus registry is the process's.
TENANT_LABELS: dict[str, str] = {}


def tenant_label(tenant: str) -> str:
    """The metrics label of a tenant ("anonymous" where no keys are configured)."""
    return TENANT_LABELS.get(tenant, tenant) or "anonymous"


def forget_replica(address: str) -> None:
    """Drop a replica's series once it has left (compose and Kubernetes hand out new addresses)."""
    for metric in _PER_REPLICA:
        try:
            metric.remove(address)
        except KeyError:
            pass
    for labels in [k for k in ROUTED._metrics if k[1] == address]:  # noqa: SLF001 (every policy's series)
        ROUTED.remove(*labels)


TOKENS_PER_SECOND = Gauge("gateway_output_tokens_per_second", "Output tokens/s over the last 10 s")
HISTOGRAMS = {
    name: Histogram(f"gateway_{name}_ms", help_text, buckets=_BUCKETS_MS)
    for name, help_text in [
        ("ttft", "Time to first token"),
        ("tpot", "Time per output token"),
        ("itl", "Inter-token latency"),
        ("e2e", "End-to-end latency"),
        ("queue", "Engine queue time"),
    ]
}


@dataclass
class RequestTimer:
    """Clock of one request, started when the gateway receives it."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    num_tokens: int = 0
    itl_ms: list[float] = field(default_factory=list)

    def on_tokens(self, n: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.itl_ms.append((now - self.last) * 1000)
        self.last = now
        self.num_tokens += n

    def timings(self) -> dict[str, float]:
        end = self.last or time.perf_counter()
        ttft = ((self.first or end) - self.start) * 1000
        e2e = (end - self.start) * 1000
        tpot = (e2e - ttft) / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0
        return dict(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e)


class GatewayMetrics:
    def __init__(self, window: int = 10000) -> None:
        self.started = time.perf_counter()
        self.requests_total = 0
        self.requests_failed = 0
        self.output_tokens = 0
        self.recent = {name: deque(maxlen=window) for name in HISTOGRAMS}
        self._token_times: deque[tuple[float, int]] = deque()

    def record_tokens(self, n: int) -> None:
        now = time.perf_counter()
        self.output_tokens += n
        OUTPUT_TOKENS.inc(n)
        self._token_times.append((now, n))
        while self._token_times and self._token_times[0][0] < now - 10:
            self._token_times.popleft()
        TOKENS_PER_SECOND.set(sum(k for _, k in self._token_times) / 10)

    def record_request(self, status: str, timer: RequestTimer, queue_ms: float | None, tenant: str = "") -> None:
        self.requests_total += 1
        REQUESTS.labels(status).inc()
        TENANT_REQUESTS.labels(tenant_label(tenant), status).inc()
        if status != "OK":
            self.requests_failed += 1
            return
        values = timer.timings()
        samples = {
            "ttft": [values["ttft_ms"]],
            "e2e": [values["e2e_ms"]],
            "itl": timer.itl_ms,
            "tpot": [values["tpot_ms"]] if timer.num_tokens > 1 else [],
            "queue": [queue_ms] if queue_ms is not None else [],
        }
        for name, vals in samples.items():
            for v in vals:
                HISTOGRAMS[name].observe(v)
                self.recent[name].append(v)

    def summary(self, name: str) -> dict[str, float]:
        vals = np.array(self.recent[name]) if self.recent[name] else np.zeros(1)
        return dict(
            mean_ms=float(vals.mean()), p50_ms=float(np.percentile(vals, 50)), p99_ms=float(np.percentile(vals, 99))
        )

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / max(time.perf_counter() - self.started, 1e-9)
