"""`bench.serve --peers llama-server`: our stack and llama.cpp's own server, the same requests.

    python -m bench.serve --workload sharegpt-synth --peers llama-server --sweep 0.2,0.4,0.8,1.2,1.6 \\
        --num-requests 32 --model dummy:gpt2
Both servers get the same model (llama-server: the f32 GGUF of --model, bench/llama_cpp_peer.py),
the same KV pool (--kv-budget-tokens), the same cores, one compute replica on our side, and at each
swept rate the same requests on the same arrival offsets (same seed), streamed over each one's
OpenAI endpoint (POST /v1/completions, token-id prompts, ignore_eos, include_usage) and measured by
the same code (bench.serve.run_load + summarize). Each arm starts fresh (caches empty) with the same
warm-up; the arms alternate, ours first at even rate indexes and llama-server first at odd ones, so
that drift of the machine during a sweep favours neither. Before anything is timed, the two must
generate the same greedy tokens (bench/peer_agreement.py). Flags: bench/llama_server_peer.py.

Service level, one for both: TTFT p99 <= 2 s, TPOT p50 <= 3x OUR TPOT p50 at the lowest swept
rate, and no failed request (llama-server has no preemption: when its unified KV fills, every
request in flight fails with "Context size has been exceeded"; --peer-slots sets its -np, by
default --max-num-seqs, the admission cap of our engine). A server's sustainable rate is
the highest swept rate that meets it (0 when none does). The last line is machine-readable:
`vs_llama_server_rate=` (ours / theirs; `inf` when llama-server meets no swept rate, said above it)
and `vs_llama_server_throughput=` (output tok/s at the top rate); `prefix_` after `vs_llama_server_`
for the shared-prefix workload.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.llama_server_peer import LlamaServer, peak_rss_mib, require_binary
from bench.peer_agreement import check_agreement
from bench.peer_slo import print_table, summary_lines
from bench.workloads import ModelLimits, fixed_length


@dataclass(frozen=True)
class Peer:
    """How every llama-server of a run is started (bench/llama_server_peer.py)."""

    gguf: Path
    threads: int
    pool_tokens: int
    slots: int
    log_dir: str  # each start's log is kept here

    def start(self) -> LlamaServer:
        return LlamaServer(self.gguf, self.threads, self.pool_tokens, self.slots, log_dir=self.log_dir)


def llama_server_run(args: argparse.Namespace, rate: float, limits: ModelLimits, peer: Peer) -> dict:
    """One fresh llama-server, the warm-up our stack gets, then the workload; its CSV row."""
    from bench.serve import draw_requests, run_load, summarize, workload_shape, write_row

    requests = draw_requests(args.workload, args.num_requests, args.seed, limits, workload_shape(args))
    with peer.start() as server:
        # No gRPC address: run_load's transports open HTTP alone, the client, arrivals and reader that
        # measure our gateway.
        warm = fixed_length(2, 40, 4, seed=args.seed + 999)
        asyncio.run(run_load("", server.url, warm, math.inf, 1.0, args.seed, "openai-http"))
        records, wall = asyncio.run(run_load("", server.url, requests, rate, args.burstiness, args.seed, "openai-http"))
        rss = server.peak_rss_mib()
    row = dict(
        timestamp_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=args.model,
        mode="llama-server",
        workload=args.workload,
        num_requests=len(requests),
        request_rate=rate,
        burstiness=args.burstiness,
        kv_budget_tokens=args.kv_budget_tokens,
        replicas=1,
        routing="",
        backend="openai-http",
        **summarize(records, requests, wall),
        peak_rss_mib=rss,
        startup_s=server.startup_s,
        peer_command=" ".join(server.command[1:]),
    )
    write_row(row, args.output)
    return row


def agree_and_measure(args: argparse.Namespace, peer: Peer) -> ModelLimits:
    """Both servers up side by side: the agreement check, then start-up time and peak memory.
    Returns the served model's limits (the workload is drawn to fit them, for both arms)."""
    from bench.serve import draw_requests, start_stack, workload_shape
    from bench.workloads import served_model_limits

    with ExitStack() as stack:
        t0 = time.perf_counter()
        gateway, _, _ = start_stack(stack, args, args.modes[0], args.routing[0])
        ours_startup = time.perf_counter() - t0
        limits = served_model_limits(gateway)
        requests = draw_requests(args.workload, args.num_requests, args.seed, limits, workload_shape(args))
        with peer.start() as server:
            print(f"llama-server {' '.join(server.command[1:])} (logs in {peer.log_dir})")
            fit = [r.prompt_token_ids for r in requests if len(r.prompt_token_ids) + 16 <= limits.context_length]
            check_agreement(gateway, server.url, fit[:4], 16)  # the workload's first 4 prompts with room for 16
            longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
            if peer.slots * longest > peer.pool_tokens:
                print(
                    f"note: {peer.slots} slots x up to {longest} tokens > the {peer.pool_tokens}-token pool: should "
                    "the requests in flight fill it, llama-server fails every one of them (it has no preemption); "
                    f"--peer-slots {max(1, peer.pool_tokens // longest)} would make it queue them instead"
                )
            ours = {pid: peak_rss_mib(pid) for pid in _children() if pid != server.proc.pid}
            print(
                f"start-up (spawn to serving): ours {ours_startup:.1f} s (memory, compute, gateway one after "
                f"another), llama-server {server.startup_s:.1f} s"
            )
            print(
                f"peak RSS after the check: ours {sum(ours.values()):.0f} MiB ("
                + ", ".join(f"{_name(p)} {v:.0f}" for p, v in ours.items())
                + f"), llama-server {server.peak_rss_mib():.0f} MiB"
            )
    return limits


class OtherCpu:
    """Core-seconds that processes outside this benchmark (itself and its reaped children: our stack,
    llama-server) used while it runs: /proc/stat's busy time less our own. llama.cpp's threads wait on
    each other at every op, so on a 2-core machine another job costs llama-server far more than us."""

    def __enter__(self) -> "OtherCpu":
        self._start = self._busy_s(), self._own_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, own = self._busy_s(), self._own_s()
        self.seconds = max(0.0, (busy - self._start[0]) - (own - self._start[1]))
        self.cores = self.seconds / (time.perf_counter() - self._start[2])  # on average over the arm

    @staticmethod
    def _busy_s() -> float:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        import resource

        return sum(
            u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        )


def _children() -> list[int]:
    return [int(p) for t in Path("/proc/self/task").iterdir() for p in (t / "children").read_text().split()]


def _name(pid: int) -> str:
    """A service's name from `python -m deploy.with_parent MODULE`."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[3].decode().split(".")[0] if len(argv) > 3 else str(pid)


def run(args: argparse.Namespace, rates: list[float]) -> None:
    """The whole comparison: agreement, then every rate with both arms, the tables, the verdict."""
    import torch

    from bench.serve import bench_one

    if args.address or args.replicas != 1 or len(args.modes) != 1:
        raise SystemExit("--peers: the benchmark starts our stack itself, with one compute replica and one mode")
    require_binary()
    try:
        from bench.llama_cpp_peer import cached_gguf
    except ImportError as exc:
        raise SystemExit(f"--peers llama-server needs llama-cpp-python and gguf: run `make peers` ({exc})") from None
    from bench.decode_speed import GGUF_CACHE

    peer = Peer(
        cached_gguf(args.model, "f32", GGUF_CACHE),
        torch.get_num_threads(),
        args.kv_budget_tokens,
        args.peer_slots or args.max_num_seqs,
        tempfile.mkdtemp(prefix="llama-server-logs-"),
    )
    limits = agree_and_measure(args, peer)
    ours_args = argparse.Namespace(**{**vars(args), "backend": "openai-http"})  # the same transport on both sides
    ours, theirs = [], []
    for i, rate in enumerate(rates):
        for arm in ("ours", "llama-server") if i % 2 == 0 else ("llama-server", "ours"):
            with OtherCpu() as other:
                if arm == "ours":
                    row = bench_one(ours_args, args.modes[0], rate)[0]
                else:
                    row = llama_server_run(args, rate, limits, peer)
            (ours if arm == "ours" else theirs).append(row)
            print(
                f"{arm} rate={rate:g}: {row['completed']} completed, {row['failed']} failed, "
                f"{row['output_token_throughput']:.1f} output tok/s; other processes used {other.seconds:.1f} "
                f"core-s of the machine meanwhile ({other.cores:.2f} cores on average)"
            )
    for rate, o, t in zip(rates, ours, theirs, strict=True):
        print_table(rate, o, t)
    for line in summary_lines(args.workload, ours, theirs):
        print(line)
