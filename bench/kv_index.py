"""How fast the memory service answers a router's Match: one call per request, the cluster's KV
index with `--cached-blocks` blocks cached across `--replicas` pools.

    python -m bench.kv_index --cached-blocks 10000 --replicas 2 --prompt-tokens 832 --calls 2000
Starts a real memory service (its own process), registers the pools and fills each with cached
prefixes through the same StepStream the compute replicas use (allocate with hashes, commit,
free: the blocks stay cached), then times Match from an asyncio gRPC client as the gateway calls
it: for a prompt every pool holds in part, and for one no pool holds. Also times the gateway's
own hashing of the prompt. The last line is machine-readable:
`match_p50_ms=... match_p99_ms=... hash_p50_ms=... cached_blocks=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import grpc
import numpy as np

from bench.quick import add_quick_flag, apply_quick, at_most
from common.block_hash import prompt_block_hashes
from deploy.run_local import running_stack
from deploy.services import ServiceSpec, free_ports
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

NAMESPACE = "dummy:gpt2|float32|float32"
BLOCK_SIZE = 16


def fill(stub, num_pools: int, cached_blocks: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """Register the pools and cache `cached_blocks` blocks across them; returns one prompt per pool
    (each pool's first cached prefix)."""
    rng = random.Random(seed)
    per_pool = cached_blocks // num_pools
    prompts = []
    for p in range(num_pools):
        pool = stub.RegisterPool(
            memory_pb2.RegisterPoolRequest(
                num_blocks=per_pool + 64, block_size=BLOCK_SIZE, replica=f"bench-{p}", address=f"10.0.0.{p}:50052"
            )
        )
        requests, cached, n = [], 0, 0
        while cached < per_pool:
            tokens = [rng.randrange(50257) for _ in range(min(prompt_tokens, (per_pool - cached) * BLOCK_SIZE) + 1)]
            hashes = prompt_block_hashes(tokens, BLOCK_SIZE, NAMESPACE)
            seq = f"s{n}"
            requests.append(
                memory_pb2.StepRequest(
                    pool_id=pool.pool_id,
                    allocate=[memory_pb2.Allocation(seq_id=seq, num_tokens=len(tokens), block_hashes=hashes)],
                )
            )
            requests.append(
                memory_pb2.StepRequest(
                    pool_id=pool.pool_id,
                    commit=[memory_pb2.Commit(seq_id=seq, first_block=0, block_hashes=hashes)],
                    free=[seq],
                )
            )
            if n == 0:
                prompts.append(tokens)
            cached += len(hashes)
            n += 1
        for _ in stub.StepStream(iter(requests)):
            pass
    stats = stub.Stats(memory_pb2.StatsRequest()).pools
    total = sum(p.num_cached_blocks for p in stats)
    print(f"{len(stats)} pools, {total} cached blocks ({', '.join(str(p.num_cached_blocks) for p in stats)})")
    return prompts


async def time_matches(address: str, hashes: list[bytes], calls: int) -> np.ndarray:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        request = memory_pb2.MatchRequest(block_hashes=hashes)
        for _ in range(50):  # warm-up: connection, first-call costs
            await stub.Match(request, timeout=5)
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            reply = await stub.Match(request, timeout=5)
            seconds.append(time.perf_counter() - start)
    print(f"  matched blocks per replica: {[r.matched_blocks for r in reply.replicas]}")
    return np.array(seconds) * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cached-blocks", type=int, default=10_000)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=832)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    add_quick_flag(ap, cached_blocks=at_most(200), calls=at_most(50))
    args = apply_quick(ap.parse_args(argv))
    port, metrics = free_ports(2)
    spec = ServiceSpec(
        "memory",
        "memory",
        "memory_service.server",
        port,
        "rpc.internal.v1.MemoryService",
        {"metrics_port": str(metrics), "lease_ttl_s": "600"},
    )
    address = f"127.0.0.1:{port}"
    with running_stack([spec]), grpc.insecure_channel(address) as channel:
        prompts = fill(
            memory_pb2_grpc.MemoryServiceStub(channel), args.replicas, args.cached_blocks, args.prompt_tokens, args.seed
        )
        cached = sum(
            p.num_cached_blocks
            for p in memory_pb2_grpc.MemoryServiceStub(channel).Stats(memory_pb2.StatsRequest()).pools
        )
        hit = prompts[0][: args.prompt_tokens]
        miss = [t + 1 for t in hit]
        hash_ms = []
        for _ in range(200):
            start = time.perf_counter()
            prompt_block_hashes(hit, BLOCK_SIZE, NAMESPACE)  # timed: what the gateway does per request
            hash_ms.append((time.perf_counter() - start) * 1000)
        results = {}
        for name, tokens in (("held", hit), ("not held", miss)):
            print(f"Match for a {len(tokens)}-token prompt {name} ({len(tokens) // BLOCK_SIZE} blocks):")
            ms = asyncio.run(time_matches(address, prompt_block_hashes(tokens, BLOCK_SIZE, NAMESPACE), args.calls))
            results[name] = ms
            print(f"  p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms over {len(ms)} calls")
    both = np.concatenate(list(results.values()))
    print(f"gateway hashing of the prompt: p50 {np.percentile(hash_ms, 50):.3f} ms")
    print(
        f"match_p50_ms={np.percentile(both, 50):.3f} match_p99_ms={np.percentile(both, 99):.3f} "
        f"hash_p50_ms={np.percentile(hash_ms, 50):.3f} cached_blocks={cached}"
    )


if __name__ == "__main__":
    main()
