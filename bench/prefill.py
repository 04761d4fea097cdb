"""How prompts of different lengths should share a prefill forward, and what a prefill costs
next to decode steps (the measurements behind the scheduler's choices in docs/benchmarks.md).

    python -m bench.prefill --model dummy:gpt2
Packed = every prompt's real tokens concatenated (what the engine does); padded = every prompt
padded to the longest, so the linear layers and attention also process the pad tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bench.quick import add_quick_flag, apply_quick, at_most
from compute_service.model import AttentionMetadata
from compute_service.weights import load_model


def forward_ms(model, seq_lens: list[int], repeats: int) -> float:
    n = sum(seq_lens)
    ids = torch.randint(0, 50000, (n,))
    positions = torch.cat([torch.arange(k) for k in seq_lens])
    last = torch.tensor(seq_lens).cumsum(0) - 1
    meta = AttentionMetadata(seq_lens=seq_lens)
    times = []
    with torch.inference_mode():
        model(ids, positions, meta, logits_indices=last)
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, positions, meta, logits_indices=last)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:gpt2")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="one prompt of this length vs --peers")
    ap.add_argument(
        "--peers",
        default="",
        type=lambda s: [p for p in s.split(",") if p],
        help="llama-cpp-f32,... : prefill tok/s of the same prompt on the same weights",
    )
    add_quick_flag(ap, model="dummy:tiny", num_prompts=at_most(2), repeats=1, prompt_tokens=at_most(64))
    args = apply_quick(ap.parse_args(argv))
    model = load_model(args.model)
    lens = np.random.default_rng(args.seed).integers(20, 300, size=args.num_prompts).tolist()
    packed = forward_ms(model, lens, args.repeats)
    padded = forward_ms(model, [max(lens)] * len(lens), args.repeats)
    print(f"{len(lens)} prompts, lengths {lens} ({sum(lens)} tokens; padded {max(lens) * len(lens)})")
    print(f"packed prefill: {packed:.1f} ms   padded prefill: {padded:.1f} ms   padded/packed = {padded / packed:.2f}x")
    one_prompt = forward_ms(model, [300], args.repeats)
    print(f"one 300-token prefill: {one_prompt:.1f} ms")
    if args.peers:
        compare_with_llama_cpp(args, model)


def compare_with_llama_cpp(args: argparse.Namespace, model) -> None:
    """One --prompt-tokens prompt: our prefill tok/s (best of --repeats) vs each llama.cpp peer's."""
    from bench.decode_speed import llama_peer_names, load_llama_peer
    from bench.workloads import fixed_length

    n = args.prompt_tokens
    ours = n / (min(forward_ms(model, [n], 1) for _ in range(args.repeats)) / 1000)
    prompt = fixed_length(1, n, 1, seed=args.seed)[0].prompt_token_ids
    ratios = []
    for name in llama_peer_names(args.peers):
        peer = load_llama_peer(name, args.model, model, n_ctx=max(1024, n + 16))
        theirs = peer.prefill_tok_per_s(prompt, repeats=args.repeats)
        peer.close()
        ratios.append(ours / theirs)
        print(
            f"prefill of {n} tokens: ours {ours:.0f} tok/s, {name} {theirs:.0f} tok/s, ours/{name} = {ratios[-1]:.2f}x"
        )
    if ratios:
        print(f"prefill_vs_llama_cpp={ratios[0]:.3f}")


if __name__ == "__main__":
    main()
