"""Every setting of the compute side, in one place: the service's (ComputeServiceConfig) and the
engine's (EngineConfig).

The service reads both from CLI flags and environment variables (`--kv-budget-tokens` /
`COMPUTE_KV_BUDGET_TOKENS`) through common.settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from common.structured_output import GrammarSettings
from compute_service.attention import ATTENTION_BACKENDS
from compute_service.linear import LINEAR_BACKENDS

DEFAULT_MODEL = "shakespeare"
MODES = ("paged", "contiguous", "no-cache")
RESERVE_POLICIES = ("max-model-len", "max-new-tokens")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8")


@dataclass
class ComputeServiceConfig(GrammarSettings):
    env_prefix: ClassVar[str] = "COMPUTE"
    host: str = "127.0.0.1"
    port: int = 50052
    memory_address: str = "127.0.0.1:50051"  # where the block tables live (required, except in no-cache mode)
    replica: str = ""  # name in stats; default hostname:port
    # Where the gateway reaches this replica, told to the memory service once it is SERVING
    # (discovery). Empty = host:port, or, when host is 0.0.0.0, the IP of the interface that routes
    # to the memory service (the network the gateway shares with it, as in compose).
    advertise_address: str = ""
    max_waiting: int = 256  # queued requests beyond this get RESOURCE_EXHAUSTED
    drain_timeout_s: float = 30.0  # on SIGTERM: time for in-flight requests to finish before they move
    # The internal services' shared token (common/grpc_auth.py): required of callers of this
    # replica and sent to the memory service. None: anyone may call, which a replica listening
    # beyond loopback refuses unless allow_unauthenticated.
    internal_token_file: str = ""
    allow_unauthenticated: bool = False


@dataclass
class EngineConfig:
    env_prefix: ClassVar[str] = "COMPUTE"
    model: str = DEFAULT_MODEL
    mode: str = "paged"  # paged | contiguous | no-cache
    block_size: int = 16  # tokens per KV block (paged); contiguous uses one block per request
    kv_budget_tokens: int = 16384  # token slots in the KV pool, the same for every mode
    reserve: str = "max-model-len"  # contiguous only: what a request reserves at admission
    max_num_seqs: int = 64
    # Paged admission keeps this many free blocks per running sequence: on a CPU a preemption's
    # recompute costs seconds, so a little headroom beats packing the pool to the last block
    # (docs/benchmarks.md, "Concurrency": 104 -> 26 preemptions on sharegpt-synth in a simulation; measured,
    # paged went from 57.3 to 60.8 tok/s).
    headroom_blocks_per_seq: int = 3
    # The step's token budget: every decode's token, then prompt chunks (chunked_prefill on), as
    # vLLM v1 schedules. Chosen by measurement (docs/benchmarks.md, "Chunked prefill").
    max_num_batched_tokens: int = 2048
    # on: a prompt longer than what the decodes leave of the budget runs in chunks over several
    # steps, beside the decodes (their inter-token latency stays bounded); off: a prompt runs whole.
    chunked_prefill: str = "on"
    # With chunked prefill, one prompt's chunk in a step at most (0 = the whole budget; vLLM's
    # long_prefill_token_threshold): bounds the stall a long prompt causes, while the budget lets
    # many short or cached prompts in at once. Off by default: 256 halves the decodes' ITL p99
    # under a shared-prefix load and doubles its TTFT p50 (docs/benchmarks.md, "Chunked prefill").
    long_prefill_token_threshold: int = 0
    device: str = "cpu"
    # Precision of the weights. On CPU: float32 (token-exact with HF) or bfloat16, the copy of the
    # weights decode's few-row products read; activations, the KV cache and prefill stay float32
    # (compute_service.linear). Elsewhere: the dtype of the whole model and KV cache.
    dtype: str = "float32"
    quantize: str = "none"  # none | int8: weight-only int8 (per-output-row scales) for decode, CPU only
    # Automatic prefix caching (paged mode): full blocks are kept, keyed by a hash of their
    # tokens and everything before them, and a prompt that starts the same way reuses them.
    prefix_caching: str = "on"  # on | off
    # Testing only: a request whose cache_salt equals this fails inside the engine's per-row output
    # handling, as a bug hit by one request's data would (tests/test_poison_requests.py proves that
    # it ends that request alone). With API keys the replica sees the salt within the tenant
    # (common/block_hash.py, tenant_cache_salt): that is what this is compared with. Empty = off.
    fault_injection_salt: str = ""
    # Kernel switches, for measuring and debugging the CPU kernels against the PyTorch paths
    # (README "Configuration"; docs/benchmarks.md measures what each buys): decode attention auto | cpp |
    # torch, few-row linear products auto (the skinny kernel where it runs) | torch, and whether a
    # decode step runs as one C++ call (on) or the Python layer loop (off).
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    fused_decode: str = "on"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reserve not in RESERVE_POLICIES:
            raise ValueError(f"reserve must be one of {RESERVE_POLICIES}, got {self.reserve!r}")
        for name in ("block_size", "kv_budget_tokens", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.quantize != "none" and (self.dtype != "float32" or not self.on_cpu):
            raise ValueError("quantize=int8 needs dtype=float32 on the CPU (the scales apply to float32 products)")
        if self.chunked_prefill not in ("on", "off"):
            raise ValueError(f"chunked_prefill must be on or off, got {self.chunked_prefill!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.chunked_prefill == "on" and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) with chunked prefill: every running sequence's decode fits a step"
            )
        if self.prefix_caching not in ("on", "off"):
            raise ValueError(f"prefix_caching must be on or off, got {self.prefix_caching!r}")
        for name, allowed in (
            ("attention_backend", ATTENTION_BACKENDS),
            ("linear_backend", LINEAR_BACKENDS),
            ("fused_decode", ("on", "off")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.on_cpu and self.dtype == "float16":
            raise ValueError("dtype=float16 is not supported on the CPU; use bfloat16")

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype the model's parameters and the KV pool are held in (float32 on the CPU)."""
        return torch.float32 if self.on_cpu else getattr(torch, self.dtype)

    @property
    def caches_prefixes(self) -> bool:
        """Prefix caching runs in paged mode only (contiguous mode is the pre-vLLM baseline)."""
        return self.prefix_caching == "on" and self.mode == "paged"

    @property
    def cache_namespace(self) -> str:
        """What a cached block's k/v depend on besides the tokens: the model and the precision
        its weights are read in (hashed into every block, common.block_hash)."""
        return f"{self.model}|{self.dtype}|{self.weight_format}"

    @property
    def weight_format(self) -> str:
        """What decode's linear layers read on the CPU: float32, bfloat16 or int8."""
        return "int8" if self.quantize == "int8" else self.dtype

    def pool_shape(self, max_model_len: int) -> tuple[int, int]:
        """(num_blocks, block_size) of the KV pool for this mode and budget."""
        if self.mode == "contiguous" and self.reserve == "max-model-len":
            block_size = max_model_len  # one block per request, sized for its maximum length
        else:
            block_size = self.block_size
        num_blocks = self.kv_budget_tokens // block_size
        if num_blocks == 0:
            raise ValueError(f"kv_budget_tokens={self.kv_budget_tokens} holds no block of {block_size} tokens")
        return num_blocks, block_size
