"""Per-tenant limits (off by default): requests in flight at once and tokens per minute, so one
key holder cannot take the capacity every other tenant shares. Over a limit the request is
refused RESOURCE_EXHAUSTED (HTTP 429) at once, with a retry-after hint, before any work on it.

Tokens per minute is a token bucket per tenant: it holds at most `tokens_per_minute` and refills
at that rate. A request is charged its worst case when admitted (prompt + n x max_new_tokens, as
OpenAI's rate limits count max_tokens) and refunded what it did not use when it ends: no request
starts that the budget does not cover, and a short answer costs only what it streamed. Tokens
replayed after a migration are not charged again. The limits are per gateway, and protect other
tenants only while the tenants' limits together fit the gateway's and replicas' capacity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from gateway.api_types import GatewayError
from gateway.metrics import TENANT_IN_FLIGHT, TENANT_LIMITED, tenant_label


@dataclass
class _Bucket:
    level: float
    updated: float = field(default_factory=time.monotonic)


@dataclass
class TenantLease:
    """One admitted request's hold on its tenant: a slot, and the tokens charged so far."""

    tenant: str
    charged: int = 0


class TenantLimits:
    def __init__(self, max_in_flight: int = 0, tokens_per_minute: int = 0) -> None:
        """0 = that limit is off."""
        self.max_in_flight, self.tokens_per_minute = max_in_flight, tokens_per_minute
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def admit(self, tenant: str) -> TenantLease:
        """A slot for one more request of `tenant`, or GatewayError RESOURCE_EXHAUSTED."""
        running = self._in_flight.get(tenant, 0)
        if self.max_in_flight and running >= self.max_in_flight:
            TENANT_LIMITED.labels(tenant_label(tenant), "in_flight").inc()
            raise GatewayError(
                "RESOURCE_EXHAUSTED",
                f"this API key's tenant has its maximum of {self.max_in_flight} requests in flight; retry later",
                retry_after_s=1.0,
            )
        self._in_flight[tenant] = running + 1
        TENANT_IN_FLIGHT.labels(tenant_label(tenant)).set(running + 1)
        return TenantLease(tenant)

    def charge(self, lease: TenantLease, tokens: int) -> None:
        """Take `tokens` from the tenant's per-minute budget, or GatewayError RESOURCE_EXHAUSTED
        (with the seconds until they would be there; none if they never fit a minute's budget)."""
        if not self.tokens_per_minute:
            return
        bucket = self._refilled(lease.tenant)
        if tokens > self.tokens_per_minute:
            TENANT_LIMITED.labels(tenant_label(lease.tenant), "tokens_per_minute").inc()
            raise GatewayError(
                "RESOURCE_EXHAUSTED",
                f"the request may use {tokens} tokens (prompt + n x max_new_tokens), more than this API key's "
                f"tenant may use in a minute ({self.tokens_per_minute}); lower max_new_tokens",
                "max_new_tokens",
            )
        if tokens > bucket.level:
            TENANT_LIMITED.labels(tenant_label(lease.tenant), "tokens_per_minute").inc()
            wait_s = (tokens - bucket.level) * 60.0 / self.tokens_per_minute
            raise GatewayError(
                "RESOURCE_EXHAUSTED",
                f"this API key's tenant is over its {self.tokens_per_minute} tokens per minute; "
                f"retry after {math.ceil(wait_s)} s",
                retry_after_s=wait_s,
            )
        bucket.level -= tokens
        lease.charged += tokens

    def release(self, lease: TenantLease, used_tokens: int) -> None:
        """The request ended having used `used_tokens`: its slot back, the unused charge refunded."""
        running = self._in_flight.get(lease.tenant, 1) - 1
        if running:
            self._in_flight[lease.tenant] = running
        else:
            self._in_flight.pop(lease.tenant, None)
        TENANT_IN_FLIGHT.labels(tenant_label(lease.tenant)).set(running)
        if lease.charged and used_tokens < lease.charged:
            bucket = self._refilled(lease.tenant)
            bucket.level = min(bucket.level + lease.charged - used_tokens, float(self.tokens_per_minute))
        lease.charged = 0

    def _refilled(self, tenant: str) -> _Bucket:
        bucket = self._buckets.setdefault(tenant, _Bucket(float(self.tokens_per_minute)))
        now = time.monotonic()
        bucket.level = min(self.tokens_per_minute, bucket.level + (now - bucket.updated) * self.tokens_per_minute / 60)
        bucket.updated = now
        return bucket
