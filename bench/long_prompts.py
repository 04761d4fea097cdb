"""Inter-token latency under long prompts: chunked prefill on against off, one run, arms alternating.

    python -m bench.serve --workload long-prompts --chunked-prefill on,off --model dummy:gpt2

8 streams decode 256 tokens each (32-token prompts, sent at once) while long prompts (900 distinct
random tokens each, so none hits the prefix cache; 16 output tokens) arrive one every period =
4 x the prefill time of one such prompt measured on this machine first (a stack with chunking
off, a lone prompt, the median TTFT of 3), shortened where that would stall under 3% of the
streams' gaps in the off arm (`arrival_plan`: p99 must see the stalls). Every arm gets the same
requests at the same offsets, on a fresh stack (memory, one compute replica, gateway) with
`--max-num-batched-tokens` (printed); the arms alternate (on, off, off, on for 2 rounds) so drift
of the machine favours neither, and each metric is the mean over an arm's rounds.
Measured: ITL p99 and TPOT p50 of the decoding streams, TTFT p50 of the long prompts, output
tokens/s of everything; and, in the off arm, the share of the decoding streams' gaps that overlap
a prefill (a gap holds the middle of [first token - prefill time, first token] of a long prompt:
in the off arm, the one step that computes it): p99 reflects stalls only when that share is over 1%. Last line:
`chunked_itl_p99_ratio=... chunked_tpot_ratio=... chunked_ttft_ratio=... chunked_throughput_ratio=...
stalled_gap_share=...` (ratios are on / off).
"""

from __future__ import annotations

import argparse
import asyncio
import math
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np

from bench.serve import RequestRecord, run_load, start_stack
from bench.workloads import Request


@dataclass(frozen=True)
class Shape:
    """The workload's sizes: decoding streams (prompt, output tokens) and long prompts."""

    streams: int = 8
    stream_prompt: int = 32
    stream_tokens: int = 256
    long_prompt: int = 900
    long_tokens: int = 16


FULL, QUICK = Shape(), Shape(streams=2, stream_prompt=8, stream_tokens=24, long_prompt=96, long_tokens=4)
MIN_STALLED_SHARE = 0.03  # of the decoding streams' gaps that overlap a prefill in the off arm
GOALS = dict(itl_p99=0.35, tpot=1.10, ttft=1.20, throughput=0.97)  # on / off: at most, at most, at most, at least


def token_times(record: RequestRecord) -> np.ndarray:
    """When each streamed chunk of a request arrived (perf_counter seconds)."""
    return record.sent_at + record.ttft + np.concatenate([[0.0], np.cumsum(record.itl)])


def drive(gateway: str, http_url: str, timed: list[tuple[float, Request]]) -> tuple[list[RequestRecord], float]:
    """Send each request at its offset (seconds from now), streamed over gRPC; wait for all."""
    offsets, requests = [t for t, _ in timed], [r for _, r in timed]
    records, wall = asyncio.run(run_load(gateway, http_url, requests, math.inf, 1.0, 0, offsets=offsets))
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[:3]}")
    return records, wall


def random_requests(rng: np.random.Generator, count: int, prompt_len: int, output_len: int) -> list[Request]:
    return [Request(rng.integers(0, 50257, size=prompt_len).tolist(), output_len) for _ in range(count)]


def calibrate(args: argparse.Namespace, shape: Shape) -> tuple[float, float]:
    """(prefill seconds of one long prompt, decode seconds per token of the 8 streams) on a
    stack with chunking off, after a warm-up."""
    rng = np.random.default_rng(args.seed + 1000)
    with ExitStack() as stack:
        gateway, _, http_url = start_stack(stack, args, "paged", "kv-aware", arm_settings(args, "off"))
        drive(gateway, http_url, [(0.0, r) for r in random_requests(rng, 2, 40, 4)])
        ttfts = []
        for req in random_requests(rng, 3, shape.long_prompt, 1):
            records, _ = drive(gateway, http_url, [(0.0, req)])
            ttfts.append(records[0].ttft)
        streams = random_requests(rng, shape.streams, shape.stream_prompt, 32)
        records, _ = drive(gateway, http_url, [(0.0, r) for r in streams])
    tpot = float(np.median([(r.e2el - r.ttft) / (r.output_tokens - 1) for r in records]))
    return float(np.median(ttfts)), tpot


def arm_settings(args: argparse.Namespace, arm: str) -> dict[str, str]:
    return {"chunked_prefill": arm, "max_num_batched_tokens": str(args.max_num_batched_tokens)}


def run_arm(
    args: argparse.Namespace, arm: str, timed: list[tuple[float, Request]], prefill_s: float, num_streams: int
) -> dict:
    with ExitStack() as stack:
        gateway, _, http_url = start_stack(stack, args, "paged", "kv-aware", arm_settings(args, arm))
        warm = random_requests(np.random.default_rng(args.seed + 2000), 2, 40, 4)
        drive(gateway, http_url, [(0.0, r) for r in warm])
        records, wall = drive(gateway, http_url, timed)
    streams, longs = records[:num_streams], records[num_streams:]
    gaps = [(t[:-1], t[1:]) for t in (token_times(r) for r in streams)]
    middles = [r.sent_at + r.ttft - prefill_s / 2 for r in longs]  # of the step computing its last token(s)
    stalled = sum(int(np.sum((lo < m) & (hi > m))) for lo, hi in gaps for m in middles)
    num_gaps = sum(len(lo) for lo, _ in gaps)
    ms = 1000.0
    return dict(
        itl_p99=float(np.percentile([g for r in streams for g in r.itl], 99)) * ms,
        itl_p50=float(np.median([g for r in streams for g in r.itl])) * ms,
        tpot=float(np.median([(r.e2el - r.ttft) / (r.output_tokens - 1) for r in streams])) * ms,
        ttft=float(np.median([r.ttft for r in longs])) * ms,
        throughput=sum(r.output_tokens for r in records) / wall,
        stalled_gap_share=stalled / max(num_gaps, 1),
    )


def arrival_plan(prefill_s: float, tpot_s: float, factor: float, stream_tokens: int) -> tuple[float, int]:
    """(period, number of long prompts). In the off arm a stream gets one stalled gap per long
    prompt arriving in its life (255 gaps of `tpot_s`, plus the stalls), so the stalled share is
    about tpot / (period - prefill). The period is `factor` x the prefill unless that share would
    be under MIN_STALLED_SHARE (p99 would then miss the stalls): then the longest period that
    reaches it, said so. As many prompts as arrive while the streams decode."""
    period = factor * prefill_s
    longest = prefill_s + tpot_s / MIN_STALLED_SHARE
    if period > longest:
        print(
            f"a period of {factor} x the prefill would stall about {tpot_s / (period - prefill_s):.1%} of the "
            f"streams' gaps (< {MIN_STALLED_SHARE:.0%}: p99 would not see them); shortened to {longest:.2f} s"
        )
        period = longest
    return period, max(2, math.ceil((stream_tokens - 1) * tpot_s / (period - prefill_s)))


def run_long_prompts(args: argparse.Namespace) -> None:
    shape = QUICK if args.quick else FULL  # --quick: the same code path at a smoke run's size
    if args.quick:
        args.compare_rounds = 1
    arms = args.chunked_prefill
    print(f"max_num_batched_tokens={args.max_num_batched_tokens} (both arms; off raises it to fit any prompt)")
    prefill_s, tpot_s = calibrate(args, shape)
    period, num_long = arrival_plan(prefill_s, tpot_s, args.period_factor, shape.stream_tokens)
    print(
        f"calibration: prefill of {shape.long_prompt} tokens {prefill_s * 1000:.0f} ms, stream decode "
        f"{tpot_s * 1000:.1f} ms/token -> a long prompt every {period:.2f} s ({period / prefill_s:.2f} x the "
        f"prefill), {num_long} of them"
    )
    rng = np.random.default_rng(args.seed)
    streams = random_requests(rng, shape.streams, shape.stream_prompt, shape.stream_tokens)
    longs = random_requests(rng, num_long, shape.long_prompt, shape.long_tokens)
    timed = [(0.0, r) for r in streams] + [(period * (k + 0.5), r) for k, r in enumerate(longs)]
    order = [arm for r in range(args.compare_rounds) for arm in (arms if r % 2 == 0 else arms[::-1])]
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for arm in order:
        row = run_arm(args, arm, timed, prefill_s, shape.streams)
        results[arm].append(row)
        print(f"chunked_prefill={arm}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
    mean = {arm: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for arm, rows in results.items()}
    if set(arms) != {"on", "off"}:
        return
    on, off = mean["on"], mean["off"]
    print("\n| metric | chunked on | chunked off | on / off | goal |\n|---|---|---|---|---|")
    labels = dict(itl_p99="decode ITL p99 (ms)", tpot="decode TPOT p50 (ms)", ttft="long-prompt TTFT p50 (ms)")
    labels["throughput"] = "output tokens/s"
    for key, label in labels.items():
        sign = ">=" if key == "throughput" else "<="
        print(f"| {label} | {on[key]:.1f} | {off[key]:.1f} | {on[key] / off[key]:.3f} | {sign} {GOALS[key]} |")
    print(f"| decode ITL p50 (ms) | {on['itl_p50']:.1f} | {off['itl_p50']:.1f} | - | - |")
    print(
        f"chunked_itl_p99_ratio={on['itl_p99'] / off['itl_p99']:.3f} chunked_tpot_ratio={on['tpot'] / off['tpot']:.3f} "
        f"chunked_ttft_ratio={on['ttft'] / off['ttft']:.3f} "
        f"chunked_throughput_ratio={on['throughput'] / off['throughput']:.3f} "
        f"stalled_gap_share={off['stalled_gap_share']:.4f}"
    )
