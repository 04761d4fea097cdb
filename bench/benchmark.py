"""Paged vs contiguous vs no KV cache, measured side by side in one run.

Two shapes of run, one CSV (bench/results/benchmark_results.csv, one row per arm):
- single stream (the original design's benchmark): one request of --prompt-tokens + --new-tokens,
  --warmup then --runs timed repetitions per mode; `--roofline` prints paged decode as a fraction
  of the hardware roofline and `--peers llama-cpp-f32,...` runs llama.cpp on the same weights
  (bench.decode_speed); `--decode-scaling 1,4,...` does both per batch size.
- `--workload sharegpt-synth --num-requests N --kv-budget-tokens T`: all N requests arrive at
  t=0 and run continuously batched over a pool of T token slots (the same T for every engine
  arm); `--peers` adds Hugging Face transformers on the same weights and requests.
- shared KV blocks (bench.sharing): `--workload shared-prefix --prefix-caching on,off`,
  `--workload parallel-sampling --n 4`, and any workload with `--prefix-caching on,off --rounds 3`.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from bench import sharing
from bench.decode_speed import decode_scaling, llama_peer_names, single_stream_comparison
from bench.local_engine import LocalEngine
from bench.quick import add_quick_flag, apply_quick, at_most, first_of, scratch_file, shared_prefix_shrink
from bench.roofline import ReadProbe
from bench.workloads import WORKLOADS, ModelLimits, Request, describe, fixed_length
from common.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results" / "benchmark_results.csv"
COLUMNS = [
    "timestamp_utc",
    "mode",
    "model",
    "device",
    "dtype",
    "workload",
    "prompt_tokens",
    "new_tokens",
    "block_size",
    "num_blocks",
    "kv_budget_tokens",
    "concurrency",
    "num_requests",
    "runs",
    "avg_seconds",
    "median_seconds",
    "min_seconds",
    "max_seconds",
    "wall_seconds",
    "tokens_per_second",
    "output_tokens_per_second",
    "speedup_vs_no_cache",
    "kv_blocks_used",
    "kv_utilization",
    "peak_concurrent_seqs",
    "mean_concurrent_seqs",
    "preemptions",
    "prefix_caching",
    "prefix_hit_rate",
    "ttft_p50_seconds",
    "quantize",
]
SHARING_WORKLOADS = ("shared-prefix", "parallel-sampling")
PAIRED_PROBE_TRIES = 3  # probe passes just before and just after each timed single-stream run


def make_engine(
    args: argparse.Namespace, mode: str, kv_budget_tokens: int, prefix_caching: str | None = None
) -> LocalEngine:
    budget = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    return LocalEngine(
        model=args.model,
        mode=mode,
        block_size=args.block_size,
        kv_budget_tokens=kv_budget_tokens,
        reserve=args.reserve,
        max_num_seqs=args.max_num_seqs,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        prefix_caching=prefix_caching or args.prefix_caching[0],
        **budget,
    )


def run_requests(engine: LocalEngine, requests: list[Request], progress: tqdm | None = None) -> float:
    """All requests at t=0, greedy, fixed output lengths (ignore_eos); returns wall seconds."""
    for r in requests:
        engine.add_request(
            r.prompt_token_ids, SamplingParams(max_new_tokens=r.output_len, temperature=0, ignore_eos=True)
        )
    start = time.perf_counter()
    while engine.has_unfinished():
        outputs = engine.step()
        if progress is not None:
            progress.update(sum(len(o.new_token_ids) for o in outputs))
    return time.perf_counter() - start


def single_stream(args: argparse.Namespace) -> list[dict]:
    request = fixed_length(1, args.prompt_tokens, args.new_tokens, seed=args.seed)
    rows, comparisons = [], []
    for mode in args.modes:
        engine = make_engine(args, mode, args.num_blocks * args.block_size)
        times, run_bandwidths = [], []
        probe = ReadProbe() if mode == "paged" and args.roofline else None  # probed around each timed run
        for run in tqdm(range(args.warmup + args.runs), desc=f"{mode:>10}", unit="run"):
            engine.stats.__init__()
            before = probe.best_gb_per_s(PAIRED_PROBE_TRIES) if probe and run >= args.warmup else 0.0
            seconds = run_requests(engine, request)
            if run >= args.warmup:
                times.append(seconds)
                if probe:
                    run_bandwidths.append(max(before, probe.best_gb_per_s(PAIRED_PROBE_TRIES)))
        del probe
        rows.append(
            dict(
                mode=mode,
                concurrency=1,
                num_requests=1,
                runs=args.runs,
                avg_seconds=statistics.mean(times),
                median_seconds=statistics.median(times),
                min_seconds=min(times),
                max_seconds=max(times),
                tokens_per_second=args.new_tokens / statistics.median(times),
                kv_blocks_used=engine.stats.peak_used_blocks,
                kv_utilization=engine.stats.mean_utilization,
                num_blocks=engine.num_blocks,
                block_size=engine.block_size,
            )
        )
        if mode == "paged" and (args.roofline or llama_peer_names(args.peers)):
            paired = [(args.new_tokens / t, bw) for t, bw in zip(times, run_bandwidths, strict=False)]
            comparisons.append((engine, rows[-1]["tokens_per_second"], paired))
    for engine, tok_s, paired in comparisons:  # after every mode ran: peers never share the CPU with us
        single_stream_comparison(args, engine, tok_s, paired)
    no_cache = next((r["median_seconds"] for r in rows if r["mode"] == "no-cache"), None)
    for row in rows:
        row.update(
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            speedup_vs_no_cache=no_cache / row["median_seconds"] if no_cache else "",
        )
    return rows


def workload_run(args: argparse.Namespace) -> list[dict]:
    requests: list[Request] = []
    rows = []
    for mode in args.modes:
        engine = make_engine(args, mode, args.kv_budget_tokens)
        if not requests:  # drawn to fit the model the engine loaded
            limits = ModelLimits(engine.max_model_len, engine.model.config.vocab_size)
            requests = WORKLOADS[args.workload](args.num_requests, seed=args.seed, limits=limits)
            print("workload", args.workload, "-", describe(requests))
            total_out = sum(r.output_len for r in requests)
        sharing.warm_up(engine, args.seed)  # on prompts that share nothing with the workload
        engine.stats.__init__()
        engine.scheduler.num_preemptions = 0
        with tqdm(total=total_out, desc=f"{mode:>10}", unit="tok") as bar:
            wall = run_requests(engine, requests, bar)
        st = engine.stats
        rows.append(
            dict(
                mode=mode,
                wall_seconds=wall,
                output_tokens_per_second=total_out / wall,
                peak_concurrent_seqs=st.peak_running,
                mean_concurrent_seqs=st.mean_running,
                preemptions=engine.scheduler.num_preemptions,
                kv_utilization=st.mean_utilization,
                kv_blocks_used=st.peak_used_blocks,
                num_blocks=engine.num_blocks,
                block_size=engine.block_size,
            )
        )
    rows += peer_rows(args, requests, total_out, rows)
    for row in rows:
        row.update(
            workload=args.workload,
            num_requests=len(requests),
            kv_budget_tokens=args.kv_budget_tokens,
            concurrency=row.get("peak_concurrent_seqs", ""),
            runs=1,
        )
    return rows


def peer_rows(args: argparse.Namespace, requests: list[Request], total_out: int, engine_rows: list[dict]) -> list[dict]:
    if not args.peers:
        return []
    from bench.hf_peers import hf_model_from_spec, run_hf_generate, run_hf_generate_batch

    hf = hf_model_from_spec(args.model)
    batch_size = next((r["peak_concurrent_seqs"] for r in engine_rows if r["mode"] == "paged"), 16)
    rows = []
    for peer in [p for p in args.peers if p not in llama_peer_names(args.peers)]:
        with tqdm(total=len(requests), desc=f"{peer:>10}", unit="req") as bar:
            if peer == "hf-generate":
                wall = run_hf_generate(hf, requests, batch_size, bar)
            elif peer == "hf-generate-batch":
                wall = run_hf_generate_batch(hf, requests, bar)
            else:
                raise ValueError(f"unknown peer {peer!r}")
        rows.append(
            dict(
                mode=peer,
                wall_seconds=wall,
                output_tokens_per_second=total_out / wall,
                peak_concurrent_seqs=batch_size if peer == "hf-generate" else "",
            )
        )
    return rows


def write_rows(rows: list[dict], args: argparse.Namespace, path: Path = RESULTS) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    existing: list[dict] = []
    if path.exists():
        with path.open() as f:
            existing = list(csv.DictReader(f))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(existing)
        for row in rows:
            writer.writerow(
                {
                    "timestamp_utc": stamp,
                    "model": args.model,
                    "device": args.device,
                    "dtype": args.dtype,
                    "quantize": getattr(args, "quantize", "none"),
                    **row,
                }
            )


def print_table(rows: list[dict]) -> None:
    keys = [k for k in COLUMNS[5:] if any(r.get(k) not in (None, "") for r in rows)]
    keys = ["mode"] + [k for k in keys if k not in ("workload", "dtype")]

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v if v is not None else "")

    widths = {k: max(len(k), *(len(fmt(r.get(k))) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-+-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(fmt(r.get(k)).ljust(widths[k]) for k in keys))


def ratio_lines(rows: list[dict]) -> list[str]:
    by = {r["mode"]: r for r in rows}
    lines = []
    if "paged" in by and "contiguous" in by and "output_tokens_per_second" in by["paged"]:
        p, c = by["paged"], by["contiguous"]
        lines.append(
            f"paged/contiguous: peak concurrency {p['peak_concurrent_seqs'] / c['peak_concurrent_seqs']:.2f}x, "
            f"output tok/s {p['output_tokens_per_second'] / c['output_tokens_per_second']:.2f}x"
        )
        for peer in ("hf-generate", "hf-generate-batch"):
            if peer in by:
                lines.append(
                    f"paged/{peer}: output tok/s "
                    f"{p['output_tokens_per_second'] / by[peer]['output_tokens_per_second']:.2f}x"
                )
    if "paged" in by and by["paged"].get("speedup_vs_no_cache"):
        lines.append(f"paged speedup over no-cache: {by['paged']['speedup_vs_no_cache']:.2f}x")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="paged,contiguous,no-cache", type=lambda s: s.split(","))
    ap.add_argument("--model", default="dummy:gpt2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 (CPU: the weights decode reads)")
    ap.add_argument("--quantize", default="none", help="none | int8 (weight-only, decode)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=256, help="single stream: pool = num_blocks x block_size")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--roofline",
        action="store_true",
        help="single stream: decode as a fraction of bytes/bandwidth (the paged mode's timed runs "
        "each get 3 probe passes over 1 GiB just before and after them)",
    )
    ap.add_argument("--workload", choices=sorted([*WORKLOADS, *SHARING_WORKLOADS]))
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--kv-budget-tokens", type=int, default=4096)
    ap.add_argument("--reserve", default="max-model-len", choices=["max-model-len", "max-new-tokens"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument(
        "--max-num-batched-tokens", type=int, help="tokens a prefill step computes at most (default: the engine's)"
    )
    ap.add_argument(
        "--peers",
        default="",
        type=lambda s: [p for p in s.split(",") if p],
        help="workload: hf-generate,hf-generate-batch; single stream and --decode-scaling: "
        "llama-cpp-f32,llama-cpp-f16,llama-cpp-q8_0 (`make peers`)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-scaling", default="", help="e.g. 1,32: decode tok/s at these batch sizes")
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--output", type=Path, default=RESULTS)
    sharing.add_arguments(ap)
    add_quick_flag(
        ap,
        **shared_prefix_shrink(),
        prompt_tokens=at_most(40),  # past two 16-token blocks: n > 1 samples share a prefix
        new_tokens=at_most(8),
        warmup=0,
        runs=1,
        rounds=1,
        n=at_most(2),
        decode_scaling=first_of(2),
        decode_context=at_most(16),
        output=scratch_file("benchmark.csv"),
    )
    return apply_quick(ap.parse_args(argv))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.decode_scaling:
        decode_scaling(args)
        return []
    last_line = ""
    if args.workload in SHARING_WORKLOADS or (args.workload and len(args.prefix_caching) > 1):
        rows, last_line = sharing.run(args, make_engine)
        for r in rows:
            r.update(workload=args.workload, kv_budget_tokens=args.kv_budget_tokens, runs=1)
    else:
        rows = workload_run(args) if args.workload else single_stream(args)
    write_rows(rows, args, args.output)  # one timestamp for the run: the notebook groups by it
    print_table(rows)
    for line in ratio_lines(rows) + ([last_line] if last_line else []):
        print(line)
    return rows


if __name__ == "__main__":
    main()
