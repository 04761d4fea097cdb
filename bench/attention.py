"""The paged attention read path against SDPA over a contiguous cache, side by side.

    python -m bench.attention --batch 32 --context 512 --block-size 16
One GPT-2-small layer (12 heads x 64), one decode query per sequence, fp32. Every paged arm
reads the same tokens from blocks scattered through the pool (random block tables), and is
checked against the contiguous result before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.quick import add_quick_flag, apply_quick, at_most
from compute_service.attention import torch_paged_decode_attention
from compute_service.native import load_extension


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    add_quick_flag(ap, batch=at_most(4), context=at_most(64), repeats=at_most(3))
    args = apply_quick(ap.parse_args(argv))
    B, T, H, D, bs = args.batch, args.context, args.n_head, args.head_dim, args.block_size
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = T // bs
    num_blocks = B * blocks_per_seq * 2  # half the pool unused, tables scattered through it
    k_pool = torch.randn(num_blocks, H, bs, D, generator=gen)
    v_pool = torch.randn(num_blocks, H, bs, D, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: B * blocks_per_seq].view(B, blocks_per_seq).to(torch.int32)
    lens = torch.full((B,), T, dtype=torch.int32)
    q = torch.randn(B, H, D, generator=gen)
    scale = D**-0.5
    # The same tokens, contiguous per sequence: (B, nh, T, hs)
    k_contig = k_pool[tables.long()].permute(0, 2, 1, 3, 4).reshape(B, H, T, D).contiguous()
    v_contig = v_pool[tables.long()].permute(0, 2, 1, 3, 4).reshape(B, H, T, D).contiguous()
    reference = F.scaled_dot_product_attention(q.unsqueeze(2), k_contig, v_contig, scale=scale).squeeze(2)

    def naive_gather():
        keys = k_pool[tables.long()].permute(0, 2, 1, 3, 4).reshape(B, H, T, D)
        values = v_pool[tables.long()].permute(0, 2, 1, 3, 4).reshape(B, H, T, D)
        return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=scale).squeeze(2)

    arms = {
        "contiguous SDPA (floor)": lambda: F.scaled_dot_product_attention(
            q.unsqueeze(2), k_contig, v_contig, scale=scale
        ),
        "naive gather + SDPA": naive_gather,
        "PyTorch fallback (index_select + SDPA)": lambda: torch_paged_decode_attention(
            q, k_pool, v_pool, tables, lens, scale
        ),
    }
    ext = load_extension()
    if ext is not None:
        arms["C++ kernel, blocks read in place"] = lambda: ext.paged_attention_decode(
            q, k_pool, v_pool, tables, lens, scale
        )
    for name, fn in arms.items():
        if name != "contiguous SDPA (floor)":
            err = (fn() - reference).abs().max().item()
            assert err < 1e-4, f"{name} disagrees with contiguous attention by {err}"
    mb = 2 * B * T * H * D * 4 / 1e6
    print(
        f"batch {B} x context {T}, {H} heads x {D}, block {bs}: {mb:.0f} MB of K+V per call, median of {args.repeats}"
    )
    floor = median_ms(arms["contiguous SDPA (floor)"], args.repeats)
    print(f"{'arm':42} {'ms':>8} {'x floor':>8}")
    ratio = float("nan")
    for name, fn in arms.items():
        ms = floor if name.startswith("contiguous") else median_ms(fn, args.repeats)
        print(f"{name:42} {ms:8.2f} {ms / floor:8.2f}")
        if name.startswith("C++"):
            ratio = ms / floor
    print(f"paged_over_contiguous={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
