"""How much memory a compute replica needs: its model's weights and its KV pool, which grow with
the model and `kv_budget_tokens`, on top of what Python, torch and gRPC take whatever the model
(measured: tests/test_k8s_manifests.py runs a replica at full pool and reads its peak).

    python -m deploy.sizing --model shakespeare --kv-budget-tokens 16384

deploy/k8s/compute.yaml's memory request and limit must be at least `suggested_limit_bytes`
(a test checks); resize them with the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

# Python + torch + gRPC + the tokenizer + the kernels, before any weight or KV: a replica of
# dummy:tiny on a 256-token pool peaked at 299 MiB (tests/test_k8s_manifests.py measures it).
RUNTIME_BYTES = 320 * 2**20
HEADROOM = 1.25  # activations of a full prefill step, allocator slack


@dataclass
class ReplicaMemory:
    weights_bytes: int
    kv_pool_bytes: int

    @property
    def suggested_limit_bytes(self) -> int:
        return int((RUNTIME_BYTES + self.weights_bytes + self.kv_pool_bytes) * HEADROOM)


def replica_memory(model: str, kv_budget_tokens: int, mode: str = "paged") -> ReplicaMemory:
    """Weights as the engine holds them (float32; tied embeddings once) and the KV pool's bytes."""
    import torch

    from compute_service.config import EngineConfig
    from compute_service.weights import load_model

    net = load_model(model)
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    num_blocks, block_size = EngineConfig(model=model, mode=mode, kv_budget_tokens=kv_budget_tokens).pool_shape(
        net.config.context_length
    )
    kv = net.config.n_layer * 2 * num_blocks * block_size * net.config.n_embd * torch.finfo(torch.float32).bits // 8
    return ReplicaMemory(weights, kv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--kv-budget-tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    m = replica_memory(args.model, args.kv_budget_tokens)
    mib = 2**20
    print(
        f"weights {m.weights_bytes / mib:.0f} MiB, KV pool {m.kv_pool_bytes / mib:.0f} MiB, "
        f"runtime {RUNTIME_BYTES / mib:.0f} MiB -> memory request/limit >= {m.suggested_limit_bytes / mib:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
