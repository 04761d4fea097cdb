"""One client request as the gateway follows it across replicas: what a continuation after a
fault resubmits (gateway.core's attempt loop keeps it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.protocol import sampling_params_to_proto
from common.sampling_params import SamplingParams
from common.text_stream import IncrementalText
from rpc.internal.v1 import compute_pb2


@dataclass
class SampleProgress:
    """One of a request's n samples: its tokens so far and the text the client has been sent."""

    text: IncrementalText
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class TrackedRequest:
    """One client request as the gateway follows it across replicas: every sample's tokens
    streamed so far (what a continuation resubmits) and which samples have ended."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    samples: list[SampleProgress]
    tenant: str = ""  # the API key's (gateway/auth.py): request ids and Abort are scoped to it
    migrations: int = 0
    replica_deaths: int = 0  # attempts whose replica broke under it (common.failures)
    queue_ms: float | None = None  # the replica's queue time, from its last Complete

    @property
    def key(self) -> tuple[str, str]:
        """What the gateway knows this request by: ids are unique within a tenant, not across."""
        return self.tenant, self.request_id

    @property
    def num_generated(self) -> int:
        return sum(len(s.generated) for s in self.samples)

    def forward(self) -> compute_pb2.GenerateRequest:
        """The replica's request: prompt + the tokens so far, the same seed, the same budget (with
        n > 1 after a fault: the samples still running, each with its tokens). Each attempt has
        its own id, so a replica still cleaning up an earlier one never collides; the tenant is
        part of it, so two tenants' equal ids never collide there either."""
        scope = f"{self.tenant}/" if self.tenant else ""  # no tenant has a '/' in it (gateway/auth.py)
        message = compute_pb2.GenerateRequest(
            request_id=f"{scope}{self.request_id}/{self.migrations}",
            prompt_token_ids=self.prompt,
            params=sampling_params_to_proto(self.params, compute_pb2.SamplingParams),
        )
        if self.params.n == 1:
            message.output_token_ids.extend(self.samples[0].generated)
        elif self.migrations:
            message.samples.extend(
                compute_pb2.SampleOutputs(index=i, output_token_ids=s.generated)
                for i, s in enumerate(self.samples)
                if not s.done
            )
        return message
