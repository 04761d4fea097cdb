"""Shared KV blocks measured side by side, in-process (one engine at a time, nothing else running):

- `--workload shared-prefix`: SGLang's "generated shared prefix" workload scaled to a CPU.
  --num-groups system prompts of --system-prompt-tokens, each followed by --prompts-per-group
  questions of --question-tokens; all requests arrive at t=0 in a seeded order that interleaves
  the groups; --new-tokens each. Arms: --prefix-caching on,off. TTFT counts from t=0.
  Last line: `prefix_cache_speedup=<tok/s on/off> ttft_ratio=<TTFT p50 off/on> hit_rate=<on>`.
- any other workload with `--prefix-caching on,off`: what caching costs when nothing is shared.
  The arms alternate over --rounds (on, off, off, on, ...) so that drift of a shared machine
  cancels; last line `no_sharing_overhead=<1 - median of the rounds' on/off throughput ratios>`.
- `--workload parallel-sampling --n 4 --prompt-tokens 512 --new-tokens 16`: one request with n
  samples (fanned out; the prompt's full blocks computed once and shared through the prefix
  cache, each sample computing only the block with the last token) against the same prompt sent as n
  separate requests at once with prefix caching off; each sample i is seeded with
  sample_seed(seed, i) in both arms, so both produce exactly the same tokens (checked). Rounds
  alternate as above; last line `n4_block_ratio=<peak KV blocks, n / separate> n4_speedup=<tok/s>`.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.local_engine import LocalEngine
from bench.workloads import WORKLOADS, ModelLimits, describe, fixed_length, shared_prefix
from common.sampling_params import SamplingParams, sample_seed


def warm_up(engine: LocalEngine, seed: int) -> None:
    """Kernels loaded, allocator paths run, on prompts that share nothing with the workload."""
    timed_run(engine, [(r.prompt_token_ids, greedy(r.output_len)) for r in fixed_length(2, 40, 4, seed=seed + 999)])


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)


def timed_run(engine: LocalEngine, work: list[tuple[list[int], SamplingParams]]) -> dict:
    """Every request at t=0; wall time, output tokens, TTFT of each request from t=0, the pool's
    prefix-cache counters over the run, and the peak of used KV blocks. Starts with an empty
    prefix cache: an earlier round's blocks must not turn this one's prompts into hits."""
    before = None
    if engine.kv_cache is not None:
        engine.reset_prefix_cache()
        before = engine.allocator.stats()
    engine.stats.__init__()
    engine.scheduler.num_preemptions = 0
    ids = [engine.add_request(prompt, params) for prompt, params in work]
    first: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {i: [[] for _ in range(p.n)] for i, (_, p) in zip(ids, work, strict=False)}
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_ids:
                first.setdefault(out.group_id, time.perf_counter() - start)
                outputs[out.group_id][out.index].extend(out.new_token_ids)
    wall = time.perf_counter() - start
    result = dict(
        wall_seconds=wall,
        output_tokens=sum(len(t) for o in outputs.values() for t in o),
        ttft_p50_seconds=statistics.median(first[i] for i in ids),
        outputs=[outputs[i] for i in ids],
        peak_blocks=engine.stats.peak_used_blocks,
        hit_rate=0.0,
    )
    if before is not None:
        after = engine.allocator.stats()
        queried = after.prefix_query_tokens - before.prefix_query_tokens
        result["hit_rate"] = (after.prefix_hit_tokens - before.prefix_hit_tokens) / queried if queried else 0.0
    result["output_tokens_per_second"] = result["output_tokens"] / wall
    return result


def row(arm: str, caching: str, run: dict, engine: LocalEngine, num_requests: int) -> dict:
    return dict(
        mode=arm,
        prefix_caching=caching,
        wall_seconds=run["wall_seconds"],
        output_tokens_per_second=run["output_tokens_per_second"],
        ttft_p50_seconds=run["ttft_p50_seconds"],
        prefix_hit_rate=run["hit_rate"],
        kv_blocks_used=run["peak_blocks"],
        num_requests=num_requests,
        peak_concurrent_seqs=engine.stats.peak_running,
        preemptions=engine.scheduler.num_preemptions,
        num_blocks=engine.num_blocks,
        block_size=engine.block_size,
    )


def shared_prefix_run(args: argparse.Namespace, make_engine) -> tuple[list[dict], str]:
    rows, runs = [], {}
    for caching in args.prefix_caching:
        engine = make_engine(args, "paged", args.kv_budget_tokens, prefix_caching=caching)
        requests = shared_prefix(
            args.num_groups,
            args.prompts_per_group,
            args.system_prompt_tokens,
            args.question_tokens,
            args.new_tokens,
            args.seed,
            engine.model.config.vocab_size,
        )
        if not rows:
            print("workload shared-prefix -", describe(requests))
        warm_up(engine, args.seed)
        runs[caching] = timed_run(engine, [(r.prompt_token_ids, greedy(r.output_len)) for r in requests])
        rows.append(row(f"paged prefix-caching={caching}", caching, runs[caching], engine, len(requests)))
    line = ""
    if {"on", "off"} <= set(runs):
        on, off = runs["on"], runs["off"]
        assert on["outputs"] == off["outputs"], "prefix caching changed a token"
        line = (
            f"prefix_cache_speedup={on['output_tokens_per_second'] / off['output_tokens_per_second']:.2f} "
            f"ttft_ratio={off['ttft_p50_seconds'] / on['ttft_p50_seconds']:.2f} hit_rate={on['hit_rate']:.3f}"
        )
    return rows, line


def alternating(rounds: int, arms: list[str]) -> list[str]:
    """on, off, off, on, on, off, ...: each arm goes first as often as the other."""
    order = []
    for r in range(rounds):
        order += arms if r % 2 == 0 else arms[::-1]
    return order


def no_sharing_overhead(args: argparse.Namespace, make_engine) -> tuple[list[dict], str]:
    engines = {c: make_engine(args, "paged", args.kv_budget_tokens, prefix_caching=c) for c in args.prefix_caching}
    first = next(iter(engines.values()))
    limits = ModelLimits(first.max_model_len, first.model.config.vocab_size)
    requests = WORKLOADS[args.workload](args.num_requests, seed=args.seed, limits=limits)
    print("workload", args.workload, "-", describe(requests))
    work = [(r.prompt_token_ids, greedy(r.output_len)) for r in requests]
    for engine in engines.values():
        warm_up(engine, args.seed)
    rows, by_arm = [], {c: [] for c in engines}
    for caching in alternating(args.rounds, list(engines)):
        run = timed_run(engines[caching], work)
        by_arm[caching].append(run)
        rows.append(row(f"paged prefix-caching={caching}", caching, run, engines[caching], len(requests)))
        print(
            f"  prefix-caching={caching}: {run['output_tokens_per_second']:.1f} tok/s, hit rate {run['hit_rate']:.3f}"
        )
    line = ""
    if {"on", "off"} <= set(by_arm):
        ratios = [
            on["output_tokens_per_second"] / off["output_tokens_per_second"]
            for on, off in zip(by_arm["on"], by_arm["off"], strict=False)
        ]
        print("rounds' on/off throughput ratios:", " ".join(f"{r:.3f}" for r in ratios))
        line = f"no_sharing_overhead={1 - statistics.median(ratios):.4f}"
    return rows, line


def parallel_sampling(args: argparse.Namespace, make_engine) -> tuple[list[dict], str]:
    prompt = fixed_length(1, args.prompt_tokens, args.new_tokens, seed=args.seed)[0].prompt_token_ids
    sampled = dict(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
    arms = {  # the same n draws either way: sample i is seeded sample_seed(seed, i)
        f"n={args.n} (one request)": ("on", [(prompt, SamplingParams(**sampled, seed=args.seed, n=args.n))]),
        f"{args.n} separate requests": (
            "off",
            [(prompt, SamplingParams(**sampled, seed=sample_seed(args.seed, i))) for i in range(args.n)],
        ),
    }
    engines = {arm: make_engine(args, "paged", args.kv_budget_tokens, prefix_caching=c) for arm, (c, _) in arms.items()}
    for engine in engines.values():
        warm_up(engine, args.seed)
    rows, by_arm = [], {arm: [] for arm in arms}
    for arm in alternating(args.rounds, list(arms)):
        run = timed_run(engines[arm], arms[arm][1])
        by_arm[arm].append(run)
        rows.append(row(arm, arms[arm][0], run, engines[arm], len(arms[arm][1])))
        print(f"  {arm}: {run['output_tokens_per_second']:.1f} tok/s, peak {run['peak_blocks']} KV blocks")
    together, separate = (by_arm[a] for a in arms)
    flat = lambda outputs: [t for o in outputs for t in o]  # noqa: E731
    assert all(flat(a["outputs"]) == flat(b["outputs"]) for a, b in zip(together, separate, strict=False)), (
        "the arms drew different tokens"
    )
    blocks = statistics.median(a["peak_blocks"] / b["peak_blocks"] for a, b in zip(together, separate, strict=False))
    speedup = statistics.median(
        a["output_tokens_per_second"] / b["output_tokens_per_second"] for a, b in zip(together, separate, strict=False)
    )
    return rows, f"n{args.n}_block_ratio={blocks:.3f} n{args.n}_speedup={speedup:.2f}"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--prefix-caching",
        default="on",
        type=lambda s: s.split(","),
        help="on | off | on,off (paged mode): workloads run once per value",
    )
    ap.add_argument("--rounds", type=int, default=3, help="on,off comparisons: alternate the arms this many times")
    ap.add_argument("--num-groups", type=int, default=8, help="shared-prefix: system prompts")
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--system-prompt-tokens", type=int, default=768)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="parallel-sampling: samples per request")


def run(args: argparse.Namespace, make_engine) -> tuple[list[dict], str]:
    """The sharing benchmark `args` names: rows for the CSV and the machine-readable last line."""
    if args.workload == "shared-prefix":
        return shared_prefix_run(args, make_engine)
    if args.workload == "parallel-sampling":
        return parallel_sampling(args, make_engine)
    return no_sharing_overhead(args, make_engine)
