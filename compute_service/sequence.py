"""A request as the engine tracks it: its tokens, its block table mirror, its state and timings.

A request with n > 1 samples is n Sequences (fanned out by the engine as it arrives): sample 0
carries the request's id, sample i the id "<id>#<i>"; all carry the request's id as group_id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from common.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    ABORT = "abort"
    ERROR = "error"  # this request alone failed (Sequence.error says why); the batch went on


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # with the position, seeds each draw (params.seed, or one the engine chose)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated (here or on another replica)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # as the memory service last reported it
    num_computed_tokens: int = 0  # leading tokens whose k/v are in the cache (chunks and decodes advance it)
    num_slots: int = 0  # token slots its block table was asked for (the whole prompt at admission, then appends)
    group_id: str = ""  # the client request's id (samples of one request share it); default request_id
    index: int = 0  # which of the request's n samples
    # Prefix caching: hashes of the full blocks of token_ids (common.block_hash), and how many
    # leading blocks the memory side can match already (found cached, or committed after the
    # forward that wrote them).
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0
    num_hit_tokens: int = 0  # prompt tokens found cached at its last admission (OpenAI's cached_tokens)
    finish_reason: FinishReason | None = None
    output_text: str = ""  # set when stop strings are checked or the sequence finishes
    error: str = ""  # why it ended with FinishReason.ERROR: a message for its client, no internals
    # Structured outputs: its llguidance matcher, advanced over every output token it has (kept
    # through preemption: the recompute changes no token); None = free text.
    grammar: object | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.group_id = self.group_id or self.request_id

    @property
    def cached_prompt_tokens(self) -> int:
        """Prompt tokens its last admission found cached (OpenAI's cached_tokens): the hit, at
        most the prompt (a recompute after preemption or a fault may hit generated tokens too)."""
        return min(self.num_hit_tokens, self.prompt_len)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
