"""Decode and prefill speed next to llama.cpp and the hardware roofline, measured in one run.

Used by bench.benchmark: a single-stream run (`--prompt-tokens 32 --new-tokens 500`) and
`--decode-scaling 1,4,8,...` print our tok/s, each llama.cpp peer's (`--peers llama-cpp-f32,
llama-cpp-f16,llama-cpp-q8_0`: the same weights written as GGUF, its logits checked against HF's
before anything is timed), the ratio, and decode as a fraction of the roofline
(bench.roofline: bytes read per step / measured read bandwidth). The last line is
machine-readable (`vs_llama_cpp=...`, `vs_llama_cpp_b1=... vs_llama_cpp_b4=...`).
llama.cpp runs with the same 2 threads (torch.get_num_threads()), one engine at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from bench.local_engine import LocalEngine
from bench.roofline import read_bandwidth_gb_per_s, roofline_tokens_per_second, weight_bytes_per_step
from bench.workloads import fixed_length
from common.sampling_params import SamplingParams

LLAMA_PEERS = {"llama-cpp-f32": "f32", "llama-cpp-f16": "f16", "llama-cpp-q8_0": "q8_0"}
GGUF_CACHE = Path.home() / ".cache" / "paged-nanogpt" / "gguf"


def llama_peer_names(peers: list[str]) -> list[str]:
    unknown = [p for p in peers if p.startswith("llama") and p not in LLAMA_PEERS]
    if unknown:
        raise ValueError(f"unknown llama.cpp peer {unknown}; choose from {sorted(LLAMA_PEERS)}")
    return [p for p in peers if p in LLAMA_PEERS]


def load_llama_peer(name: str, model_spec: str, model, n_seq_max: int = 1, n_ctx: int = 1024):
    """A llama.cpp peer on our weights, after checking its logits against HF's (raises if not)."""
    try:
        from bench.llama_cpp_peer import LlamaCppPeer, cached_gguf, check_logits
    except ImportError as exc:
        raise SystemExit(f"{name} needs llama-cpp-python and gguf: run `make peers` ({exc})") from None
    ftype = LLAMA_PEERS[name]
    peer = LlamaCppPeer(
        cached_gguf(model_spec, ftype, GGUF_CACHE), n_threads=torch.get_num_threads(), n_ctx=n_ctx, n_seq_max=n_seq_max
    )
    prompt = fixed_length(1, 32, 1, seed=1)[0].prompt_token_ids
    diff = check_logits(peer, model, prompt, ftype)
    print(f"{name}: logits agree with HF on our weights (max |diff| {diff:.2e})")
    return peer


def _machine_line(bandwidth: float) -> str:
    return f"threads={torch.get_num_threads()} read_bandwidth={bandwidth:.1f} GB/s (probe: best of 7 passes over 1 GiB)"


def single_stream_comparison(
    args: argparse.Namespace, engine: LocalEngine, ours_tok_s: float, paired_runs: Sequence[tuple[float, float]] = ()
) -> None:
    """Our paged single-stream decode vs each llama.cpp peer, and vs the roofline: once against
    a probe taken now (best of 7), and, given `paired_runs` ((tok/s, GB/s) of each timed run and
    the best probe pass just before or after it), run by run: on a VM whose bandwidth drifts
    between minutes, only the paired fractions compare like with like."""
    model = engine.model
    bandwidth = read_bandwidth_gb_per_s()
    context = args.prompt_tokens + args.new_tokens // 2  # mean context over the run
    roofline = roofline_tokens_per_second(model, 1, context, bandwidth)
    print(_machine_line(bandwidth))
    print(
        f"roofline: {weight_bytes_per_step(model) / 1e6:.0f} MB of weights ({engine.config.weight_format}) + KV "
        f"per token at {bandwidth:.1f} GB/s = {roofline:.1f} tok/s; paged decode {ours_tok_s:.1f} tok/s = "
        f"{ours_tok_s / roofline:.0%} of it"
    )
    if paired_runs:
        fractions = [tok_s / roofline_tokens_per_second(model, 1, context, bw) for tok_s, bw in paired_runs]
        runs = ", ".join(
            f"{tok_s:.1f} tok/s at {bw:.1f} GB/s = {f:.1%}"
            for (tok_s, bw), f in zip(paired_runs, fractions, strict=False)
        )
        print(
            f"roofline, paired (each run against the best of the probe passes just before and after it): "
            f"{runs}; median {statistics.median(fractions):.1%}"
        )
    prompt = fixed_length(1, args.prompt_tokens, 1, seed=args.seed)[0].prompt_token_ids
    ratios = []
    for name in llama_peer_names(args.peers):
        peer = load_llama_peer(name, args.model, model)
        runs = [peer.decode_single(prompt, args.new_tokens)[1] for _ in range(max(1, args.runs))]
        peer.close()
        theirs = sorted(runs)[len(runs) // 2]
        ratios.append(ours_tok_s / theirs)
        print(f"{name}: {theirs:.1f} tok/s decode (median of {len(runs)}); ours/{name} = {ratios[-1]:.2f}x")
    if ratios:
        print(f"vs_llama_cpp={ratios[0]:.3f}")


def decode_tokens_per_second(args: argparse.Namespace, batch: int, context: int, steps: int = 24) -> float:
    """Our decode tok/s with `batch` sequences of `context` tokens each (prefill not timed)."""
    blocks_per_seq = -(-(context + steps + 2) // args.block_size) + 1
    engine = LocalEngine(
        model=args.model,
        mode="paged",
        block_size=args.block_size,
        kv_budget_tokens=(batch * blocks_per_seq + 2) * args.block_size,
        headroom_blocks_per_seq=0,
        max_num_seqs=max(batch, 1),
        dtype=args.dtype,
        quantize=args.quantize,
    )
    for r in fixed_length(batch, context, steps + 2, seed=args.seed):
        engine.add_request(
            r.prompt_token_ids, SamplingParams(max_new_tokens=r.output_len, temperature=0, ignore_eos=True)
        )
    while any(s.num_tokens == s.prompt_len for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everyone first
    engine.step()  # one untimed decode step
    if len(engine.scheduler.running) != batch or engine.scheduler.waiting:
        raise RuntimeError(f"only {len(engine.scheduler.running)} of {batch} sequences running: pool too small")
    start = time.perf_counter()
    stepped = 0
    for _ in range(steps):
        stepped += len(engine.scheduler.running)
        engine.step()
    return stepped / (time.perf_counter() - start)


def decode_scaling(args: argparse.Namespace) -> None:
    """Batch scaling of decode at a fixed context: ours, llama.cpp's (one llama_batch per step),
    the ratio, and ours as a fraction of the roofline."""
    batches = [int(b) for b in args.decode_scaling.split(",")]
    context = args.decode_context
    names = llama_peer_names(args.peers)
    model = LocalEngine(model=args.model, mode="no-cache", dtype=args.dtype, quantize=args.quantize).model
    bandwidth = read_bandwidth_gb_per_s()
    print(
        f"decode at {context}-token context, {args.model}, weights {args.dtype}/{args.quantize}; "
        + _machine_line(bandwidth)
    )
    peers = {
        name: load_llama_peer(name, args.model, model, n_seq_max=max(batches), n_ctx=max(batches) * (context + 64))
        for name in names
    }
    header = f"{'batch':>6} {'ours tok/s':>11} {'roofline':>9} {'of roofline':>12}"
    header += "".join(f" {name:>16} {'ours/' + name.removeprefix('llama-cpp-'):>11}" for name in names)
    print(header)
    summary = []
    for batch in batches:
        ours = decode_tokens_per_second(args, batch, context)
        roofline = roofline_tokens_per_second(model, batch, context, bandwidth)
        line = f"{batch:>6} {ours:11.1f} {roofline:9.1f} {ours / roofline:12.0%}"
        prompts = [r.prompt_token_ids for r in fixed_length(batch, context, 1, seed=args.seed)]
        for i, name in enumerate(names):
            theirs = peers[name].decode_batched(batch, prompts, steps=24)
            line += f" {theirs:16.1f} {ours / theirs:11.2f}"
            if i == 0:
                summary.append(f"vs_llama_cpp_b{batch}={ours / theirs:.3f}")
        print(line)
    for peer in peers.values():
        peer.close()
    if summary:
        print(" ".join(summary))
