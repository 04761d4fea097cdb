"""Serving benchmark: open-loop requests streamed through the gateway, vLLM's metric names.

    python -m bench.serve --request-rate 4 --num-requests 64 --workload sharegpt-synth
Arrivals are gamma-distributed (shape = --burstiness, 1.0 = Poisson) with mean gap 1/rate;
`inf` sends everything at t=0. Unless --address names a running gateway, the benchmark starts its
own stack (memory, compute, gateway on free loopback ports) with --model/--mode/--kv-budget-tokens.
The workload is drawn to fit the served model: its context length and vocabulary come from the
gateway's GetModelInfo (bench/workloads.py says how requests are fitted).
Metrics (vLLM's serving benchmark definitions): TTFT = first token - send; E2EL = last token -
send; TPOT = (E2EL - TTFT) / (output tokens - 1); ITL = gaps between streamed chunks; normalized
latency = E2EL / output tokens. One row per run in bench/results/serving_results.csv.
--replicas N starts N compute replicas (one torch thread each when N > 1 on this machine's cores)
and --routing names the gateway's policies to compare (bench/routing.py sums them up); the
`shared-prefix` workload takes --num-groups, --prompts-per-group, --system-prompt-tokens,
--question-tokens and --new-tokens. Every run starts a fresh stack: caches start empty.
--compare-in-process also runs the same workload in-process and prints the split's efficiency; the
arms alternate (services, in-process, in-process, services for --compare-rounds 2) so that drift
of a shared machine during the run cancels instead of landing on one arm.
--peers llama-server runs llama.cpp's own server beside our stack on the same requests (bench/serve_peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from bench.quick import add_quick_flag, apply_quick, at_most, fast_sweep, scratch_file, shared_prefix_shrink
from bench.transports import BACKENDS, Transports, paired_run, report_pairs
from bench.workloads import WORKLOADS, ModelLimits, Request, describe, fixed_length, served_model_limits, shared_prefix
from rpc.internal.v1 import compute_pb2, compute_pb2_grpc

RESULTS = Path(__file__).parent / "results" / "serving_results.csv"


@dataclass
class RequestRecord:
    output_tokens: int = 0
    ttft: float = math.nan
    e2el: float = math.nan
    itl: list[float] = field(default_factory=list)
    error: str = ""
    replica: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sent_at: float = math.nan  # perf_counter() when it was sent (run_load)


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    return np.cumsum(gaps).tolist()


async def run_load(
    gateway: str,
    http_url: str,
    requests: list[Request],
    rate: float,
    burstiness: float,
    seed: int,
    backend: str = "grpc",
    credentials: tuple[str, str] = ("", ""),
    offsets: list[float] | None = None,
):
    """Open-loop arrivals, each request streamed over `backend` (grpc | openai-http); `offsets`
    (seconds from the start, ascending) instead of drawing them from rate and burstiness."""
    offsets = offsets if offsets is not None else arrival_offsets(len(requests), rate, burstiness, seed)
    records = [RequestRecord() for _ in requests]
    async with Transports(gateway, http_url, *credentials) as transports:
        with tqdm(total=len(requests), desc=f"rate {rate}", unit="req") as progress:
            start = time.perf_counter()
            tasks = []
            for req, rec, offset in zip(requests, records, offsets, strict=False):
                delay = start + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec.sent_at = time.perf_counter()
                tasks.append(asyncio.create_task(transports.send(backend, req, rec, progress)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
    return records, wall


def summarize(records: list[RequestRecord], requests: list[Request], wall: float) -> dict:
    ok = [r for r in records if not r.error]
    ms = lambda xs: np.array(xs, dtype=float) * 1000  # noqa: E731
    ttft, e2el = ms([r.ttft for r in ok]), ms([r.e2el for r in ok])
    tpot = ms([(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    itl = ms([gap for r in ok for gap in r.itl])
    norm = ms([r.e2el / r.output_tokens for r in ok if r.output_tokens])
    out_tokens = sum(r.output_tokens for r in ok)
    row = dict(
        completed=len(ok),
        failed=len(records) - len(ok),
        wall_seconds=wall,
        request_throughput=len(ok) / wall,
        output_token_throughput=out_tokens / wall,
        total_token_throughput=(out_tokens + sum(len(q.prompt_token_ids) for q in requests)) / wall,
        mean_normalized_latency_ms=float(norm.mean()) if len(norm) else math.nan,
        prefix_hit_rate=sum(r.cached_tokens for r in ok) / max(sum(r.prompt_tokens for r in ok), 1),
    )
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        row[f"mean_{name}_ms"] = float(values.mean()) if len(values) else math.nan
        row[f"median_{name}_ms"] = float(np.median(values)) if len(values) else math.nan
        row[f"p99_{name}_ms"] = float(np.percentile(values, 99)) if len(values) else math.nan
    return row


def start_stack(
    stack: ExitStack, args: argparse.Namespace, mode: str, routing: str, compute: dict[str, str] | None = None
) -> tuple[str, list[str], str]:
    """Memory, --replicas computes and the gateway on free ports; returns the gateway's gRPC address
    and the replicas'. `compute`: more settings of the replicas (their EngineConfig names)."""
    from deploy.run_local import running_stack
    from deploy.services import free_ports, local_services

    memory, gateway, m1, m2, http, *computes = free_ports(5 + args.replicas)
    settings = {
        "model": args.model,
        "mode": mode,
        "kv_budget_tokens": str(args.kv_budget_tokens),
        "max_num_seqs": str(args.max_num_seqs),
        **(compute or {}),
    }
    services = local_services(
        memory,
        tuple(computes),
        gateway,
        m1,
        m2,
        compute_settings=settings,
        gateway_settings={"routing": routing},
        gateway_http_port=http,
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    if args.replicas > 1:  # the replicas share this machine's cores: no oversubscription
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.replicas))
    try:
        stack.enter_context(running_stack(services))  # the services start with it; this process keeps its own
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return f"127.0.0.1:{gateway}", [f"127.0.0.1:{c}" for c in computes], f"http://127.0.0.1:{http}"


def compute_info(address: str) -> compute_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return compute_pb2_grpc.ComputeServiceStub(channel).Info(compute_pb2.InfoRequest(), timeout=10)


def in_process_run(args: argparse.Namespace, mode: str, requests: list[Request]) -> dict:
    """The same requests on a LocalEngine in this process: output tok/s, and the scheduler's
    steps and preemptions (so the two arms can be checked to have scheduled alike)."""
    from bench.benchmark import run_requests
    from bench.local_engine import LocalEngine

    engine = LocalEngine(
        model=args.model, mode=mode, kv_budget_tokens=args.kv_budget_tokens, max_num_seqs=args.max_num_seqs
    )
    run_requests(engine, requests[:2])  # warm-up, as the served stack got one
    before = engine.load()
    with tqdm(total=sum(r.output_len for r in requests), desc="in-process", unit="tok") as bar:
        wall = run_requests(engine, requests, bar)
    return dict(
        output_token_throughput=sum(r.output_len for r in requests) / wall,
        num_steps=engine.load().num_schedule_rounds - before.num_schedule_rounds,
        num_preemptions=engine.load().num_preemptions - before.num_preemptions,
    )


def compare_split(args: argparse.Namespace, requests: list[Request], rate: float, first: dict) -> None:
    """Throughput through the services over in-process, arms alternated (S I, then I S, ...) so that
    a machine that speeds up or slows down during the run favours neither; `first` is the services
    run already made. Ends with the machine-readable line."""
    mode = args.modes[0]
    order = [
        arm
        for r in range(args.compare_rounds)
        for arm in (("services", "in-process") if r % 2 == 0 else ("in-process", "services"))
    ]
    services, local = [first], []
    for arm in order[1:]:
        if arm == "services":
            services.append(bench_one(args, mode, rate)[0])
        else:
            local.append(in_process_run(args, mode, requests))
            print(
                f"in-process: {local[-1]['output_token_throughput']:.1f} output tok/s, {local[-1]['num_steps']} "
                f"steps, {local[-1]['num_preemptions']} preemptions"
            )
    mean = lambda rows, key: float(np.mean([r.get(key, math.nan) for r in rows]))  # noqa: E731
    through, in_process = mean(services, "output_token_throughput"), mean(local, "output_token_throughput")
    print(
        f"order {' '.join(order)}: services "
        + " / ".join(f"{r['output_token_throughput']:.1f}" for r in services)
        + " tok/s, in-process "
        + " / ".join(f"{r['output_token_throughput']:.1f}" for r in local)
        + " tok/s"
    )
    print(
        f"split_efficiency={through / in_process:.3f} "
        f"memory_rpc_p50_ms={mean(services, 'memory_rpc_p50_ms'):.3f} "
        f"memory_calls_per_step={mean(services, 'memory_calls_per_step'):.2f}"
    )


def write_row(row: dict, path: Path = RESULTS) -> None:
    """Append a row; a row with columns the file lacks rewrites it with every column (old rows
    get them empty), so runs of different kinds share one CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, columns = [], list(row)
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or []) + [c for c in row if c not in (reader.fieldnames or [])]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([*rows, row])


@functools.lru_cache(maxsize=4)
def draw_requests(
    workload: str, num_requests: int, seed: int, limits: ModelLimits, shape: tuple[int, ...] = ()
) -> list[Request]:
    """The workload's requests; `shape` = (groups, per group, system, question, new tokens, prompt
    tokens) for shared-prefix and fixed."""
    if workload == "fixed":  # every request: --prompt-tokens random tokens, --new-tokens out
        requests = fixed_length(num_requests, shape[5], shape[4], seed=seed)
    elif workload == "shared-prefix":  # num_groups x prompts_per_group requests (--num-requests does not apply)
        system, question, new = shape[2:5]
        if system + question + new > limits.context_length:
            raise ValueError(
                f"shared-prefix requests of {system + question + new} tokens do not fit the served "
                f"model's context ({limits.context_length})"
            )
        requests = shared_prefix(*shape[:5], seed=seed, vocab_size=limits.vocab_size)
    else:
        requests = WORKLOADS[workload](num_requests, seed=seed, limits=limits)
    print(f"workload {workload} for context {limits.context_length} - {describe(requests)}")
    return requests


def workload_shape(args: argparse.Namespace) -> tuple[int, ...]:
    return (
        args.num_groups,
        args.prompts_per_group,
        args.system_prompt_tokens,
        args.question_tokens,
        args.new_tokens,
        args.prompt_tokens,
    )


def compare_transports(args: argparse.Namespace) -> None:
    """--backend both: what the HTTP front adds to gRPC, measured on one stack (bench.transports)."""
    with ExitStack() as stack:
        if args.address:
            gateway, http_url = args.address, args.http_address
        else:
            gateway, _, http_url = start_stack(stack, args, args.modes[0], args.routing[0])
        limits = served_model_limits(gateway, api_key=args.api_key, tls_ca_file=args.tls_ca)
        requests = draw_requests(args.workload, args.num_requests, args.seed, limits, workload_shape(args))
        gap = 0.0 if math.isinf(args.request_rate) else 1.0 / args.request_rate

        async def run() -> dict:
            async with Transports(gateway, http_url, args.api_key, args.tls_ca) as transports:
                await paired_run(
                    transports, fixed_length(4, 40, 4, seed=args.seed + 999), 0.0, RequestRecord
                )  # warm-up
                return await paired_run(transports, requests, gap, RequestRecord)

        records = asyncio.run(run())
    report_pairs(records)


def bench_one(args, mode: str, rate: float, routing: str = "") -> tuple[dict, list[Request]]:
    """One run through the gateway; returns its row and the requests it sent."""
    routing = routing or args.routing[0]
    with ExitStack() as stack:
        if args.address:
            gateway, computes, http_url = args.address, [], args.http_address
        else:
            gateway, computes, http_url = start_stack(stack, args, mode, routing)
        limits = served_model_limits(gateway, api_key=args.api_key, tls_ca_file=args.tls_ca)
        requests = draw_requests(args.workload, args.num_requests, args.seed, limits, workload_shape(args))
        # Warm-up on prompts that share nothing with the workload: no measured prompt is cached by it.
        asyncio.run(
            run_load(
                gateway,
                http_url,
                fixed_length(2 * max(len(computes), 1), 40, 4, seed=args.seed + 999),
                math.inf,
                1.0,
                args.seed,
                args.backend,
                (args.api_key, args.tls_ca),
            )
        )
        before = [compute_info(c) for c in computes]
        records, wall = asyncio.run(
            run_load(
                gateway, http_url, requests, rate, args.burstiness, args.seed, args.backend, (args.api_key, args.tls_ca)
            )
        )
        after = [compute_info(c) for c in computes]
    row = dict(
        timestamp_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=args.model,
        mode=mode,
        workload=args.workload,
        num_requests=len(requests),
        request_rate=rate,
        burstiness=args.burstiness,
        kv_budget_tokens=args.kv_budget_tokens,
        replicas=max(len(computes), 1),
        routing=routing,
        backend=args.backend,
        **summarize(records, requests, wall),
    )
    for b, a in zip(before, after, strict=False):
        print(
            f"compute replica {a.replica}: {a.num_schedule_rounds - b.num_schedule_rounds} steps, "
            f"{a.num_preemptions - b.num_preemptions} preemptions, "
            f"{sum(r.replica == a.replica for r in records)} requests"
        )
    if len(computes) > 1:
        row["requests_per_replica"] = "/".join(str(sum(r.replica == a.replica for r in records)) for a in after)
    elif computes:
        (b,), (a,) = before, after
        row["memory_calls_per_step"] = (a.num_memory_calls - b.num_memory_calls) / max(
            a.num_schedule_rounds - b.num_schedule_rounds, 1
        )
        row["memory_rpc_p50_ms"] = a.memory_rpc_p50_ms
    write_row(row, args.output)
    return row, requests


def sustainable_rate(rows: list[dict], factor: float = 2.0) -> tuple[float, float]:
    """(highest swept rate whose mean normalized latency stays under `factor` x the lowest rate's,
    the rate where the curve crosses that line, interpolated in log-log between swept points)."""
    rows = sorted(rows, key=lambda r: r["request_rate"])
    limit = factor * rows[0]["mean_normalized_latency_ms"]
    best, crossing = rows[0]["request_rate"], math.nan
    for lo, hi in zip(rows, rows[1:], strict=False):
        if hi["mean_normalized_latency_ms"] >= limit:
            x0, x1 = math.log(lo["request_rate"]), math.log(hi["request_rate"])
            y0, y1 = math.log(lo["mean_normalized_latency_ms"]), math.log(hi["mean_normalized_latency_ms"])
            crossing = math.exp(x0 + (math.log(limit) - y0) * (x1 - x0) / (y1 - y0))
            break
        best = hi["request_rate"]
    return best, crossing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--request-rate", type=float, default=math.inf)
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument(
        "--workload", default="sharegpt-synth", choices=sorted([*WORKLOADS, "shared-prefix", "fixed", "long-prompts"])
    )
    ap.add_argument("--prompt-tokens", type=int, default=64, help="fixed: prompt tokens of each request")
    ap.add_argument("--num-groups", type=int, default=16, help="shared-prefix: system prompts")
    ap.add_argument("--prompts-per-group", type=int, default=8)
    ap.add_argument("--system-prompt-tokens", type=int, default=768)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32, help="shared-prefix: output tokens of each request")
    ap.add_argument("--replicas", type=int, default=1, help="compute replicas of the stack the benchmark starts")
    ap.add_argument(
        "--routing",
        default="kv-aware",
        type=lambda s: s.split(","),
        help="the gateway's routing policies to run (comma-separated): kv-aware, least-loaded, round-robin",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--address", default="", help="a running gateway; empty = start a stack")
    ap.add_argument("--http-address", default="http://127.0.0.1:8000", help="its HTTP front (with --address)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""), help="for a gateway with API keys")
    ap.add_argument("--tls-ca", default="", help="PEM certificate to verify a TLS gateway (with --address)")
    ap.add_argument(
        "--backend",
        default="grpc",
        choices=BACKENDS,
        help="transport to the gateway; both = the paired gRPC vs HTTP comparison (bench/transports.py)",
    )
    ap.add_argument("--model", default="dummy:gpt2")
    ap.add_argument("--modes", default="paged", type=lambda s: s.split(","))
    ap.add_argument("--kv-budget-tokens", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--sweep", default="", help="comma-separated request rates, run for every mode")
    ap.add_argument("--compare-in-process", action="store_true")
    ap.add_argument(
        "--compare-rounds", type=int, default=2, help="rounds of (services, in-process), alternating which goes first"
    )
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--chunked-prefill", default="on,off", type=lambda s: s.split(","), help="long-prompts: arms")
    ap.add_argument("--max-num-batched-tokens", type=int, default=256, help="long-prompts: the step's token budget")
    ap.add_argument("--period-factor", type=float, default=4.0, help="long-prompts: arrival period / prefill time")
    ap.add_argument("--peers", default="", choices=["", "llama-server"], help="a peer server beside ours")
    ap.add_argument("--peer-slots", type=int, default=0, help="llama-server's -np (0 = --max-num-seqs)")
    add_quick_flag(
        ap,
        **shared_prefix_shrink(),
        prompt_tokens=at_most(16),
        new_tokens=at_most(4),
        sweep=fast_sweep(),
        compare_rounds=1,
        output=scratch_file("serve.csv"),
    )
    args = apply_quick(ap.parse_args(argv))
    if args.backend == "both":
        compare_transports(args)
        return
    if args.workload == "long-prompts":
        from bench.long_prompts import run_long_prompts

        run_long_prompts(args)
        return
    rates = [float(r) for r in args.sweep.split(",")] if args.sweep else [args.request_rate]
    if args.peers:
        from bench.serve_peers import run

        run(args, rates)
        return
    by_arm: dict[tuple[str, str], list[dict]] = {}
    for mode in args.modes:
        for policy in args.routing:
            for rate in rates:
                row, requests = bench_one(args, mode, rate, policy)
                by_arm.setdefault((mode, policy), []).append(row)
                print(
                    f"{mode} {policy} rate={rate}: "
                    + ", ".join(
                        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                        if k not in ("timestamp_utc", "model", "workload", "mode", "request_rate", "routing")
                    )
                )
    if len(rates) > 1:
        sustained = {arm: sustainable_rate(rows) for arm, rows in by_arm.items()}
        for (mode, policy), (best, crossing) in sustained.items():
            print(
                f"{mode} {policy}: normalized latency under 2x its {min(rates)} req/s value up to {best} req/s "
                f"(crosses 2x at {crossing:.3f} req/s)"
            )
        first = args.routing[0]
        if {("paged", first), ("contiguous", first)} <= set(sustained):
            (p_best, p_cross), (c_best, c_cross) = sustained[("paged", first)], sustained[("contiguous", first)]
            print(f"sustainable_rate_ratio={p_best / c_best:.2f} crossing_ratio={p_cross / c_cross:.2f}")
        if {"kv-aware", "round-robin"} <= set(args.routing):
            from bench.routing import compare_policies

            compare_policies(args, by_arm, sustained, bench_one)
    if args.compare_in_process:
        compare_split(args, requests, rates[-1], row)


if __name__ == "__main__":
    main()
