"""What the engine hands out: a step's output per request, a finished request's result, and the
running counters the service and the benchmarks read."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.sampling_params import TokenLogprobs
from compute_service.sequence import Sequence


@dataclass
class RequestOutput:
    """What one step produced for one request (new tokens; the rest once it finishes)."""

    request_id: str  # the sequence's: the request's id for sample 0, "<id>#<i>" for sample i
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    sequence: Sequence | None = None
    group_id: str = ""  # the request's id (every sample's outputs go to its stream)
    index: int = 0  # which sample
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of new_token_ids, if the request asked
    error: str = ""  # finish_reason "error": why this request failed (the rest of the batch did not)


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    queue_seconds: float
    ttft_seconds: float
    total_seconds: float
    num_preemptions: int
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    index: int = 0
    samples: list[GenerationResult] | None = None  # n > 1: every sample, by index (this one first)


@dataclass
class StepStats:
    """Running totals the benchmarks read: concurrency, preemptions, KV utilization."""

    num_forwards: int = 0
    sum_running: int = 0
    peak_running: int = 0
    sum_utilization: float = 0.0
    num_utilization_samples: int = 0
    peak_used_blocks: int = 0

    @property
    def mean_running(self) -> float:
        return self.sum_running / self.num_forwards if self.num_forwards else 0.0

    @property
    def mean_utilization(self) -> float:
        return self.sum_utilization / self.num_utilization_samples if self.num_utilization_samples else 0.0


@dataclass
class EngineLoad:
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_schedule_rounds: int  # rounds that talked to memory (a step, or a call that only frees)
    num_memory_calls: int


def to_result(seq: Sequence) -> GenerationResult:
    return GenerationResult(
        request_id=seq.request_id,
        prompt_token_ids=seq.prompt_token_ids,
        token_ids=seq.output_token_ids,
        text=seq.output_text,
        finish_reason=seq.finish_reason.value,
        queue_seconds=(seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time,
        ttft_seconds=(seq.first_token_time or seq.finish_time) - seq.arrival_time,
        total_seconds=seq.finish_time - seq.arrival_time,
        num_preemptions=seq.num_preemptions,
        cached_tokens=seq.cached_prompt_tokens,
        index=seq.index,
    )
