"""What block events cost a step: the memory service's step latency with events on and a live
subscriber, against events off, measured side by side.

    python -m bench.events_overhead --rounds 6 --steps 400

Two memory services run at once (same machine, same settings but `block_events`); the one with
events has a WatchEvents subscriber that reads every event (a plain gRPC subscriber, not a
browser; in a process of its own), and optionally `--event-log` writes the JSON-lines file too. A client drives the same
decode-like steps through each one's StepStream (`--seqs` sequences, one token each per step; one
sequence ends and a new one of `--prompt-tokens` is admitted every step), timing each step's
round trip. Arms alternate (on, off, off, on, ...) so drift of the machine favours neither; the
last line is `events_step_ratio=<p50 on / p50 off>` (goal: <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import tempfile
import time

import grpc
import numpy as np

from bench.quick import add_quick_flag, apply_quick, at_most
from deploy.run_local import start_serving, stop_service
from deploy.services import ServiceSpec, free_ports
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc


def start_memory(events: bool, log_dir: str, event_log: str = ""):
    port, metrics = free_ports(2)
    settings = {
        "metrics_port": str(metrics),
        "http_port": "0",
        "block_events": str(events).lower(),
        "event_log": event_log,
    }
    spec = ServiceSpec(
        f"memory-{'on' if events else 'off'}",
        "memory",
        "memory_service.server",
        port,
        "rpc.internal.v1.MemoryService",
        settings,
    )
    return start_serving(spec, log_dir, timeout_s=60), f"127.0.0.1:{port}"


def subscribe(address: str, counted) -> None:
    """The watcher, in its own process (in the timing client's process it would take the GIL from it)."""
    with grpc.insecure_channel(address) as channel:
        try:
            for batch in memory_pb2_grpc.MemoryServiceStub(channel).WatchEvents(memory_pb2.WatchEventsRequest()):
                with counted.get_lock():
                    counted.value += len(json.loads(batch.json))
        except grpc.RpcError:
            pass


def run_steps(address: str, args: argparse.Namespace, round_no: int) -> list[float]:
    """One round: register a pool, `--steps` timed steps, release. Returns each step's seconds."""
    with grpc.insecure_channel(address) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        pool = stub.RegisterPool(
            memory_pb2.RegisterPoolRequest(num_blocks=args.num_blocks, block_size=16, replica=f"bench-{round_no}")
        ).pool_id
        requests: queue.SimpleQueue = queue.SimpleQueue()
        answers = stub.StepStream(iter(requests.get, None))
        live = [f"r{round_no}-s{i}" for i in range(args.seqs)]
        requests.put(
            memory_pb2.StepRequest(
                pool_id=pool,
                step=1,
                allocate=[memory_pb2.Allocation(seq_id=s, num_tokens=args.prompt_tokens) for s in live],
            )
        )
        next(answers)
        times = []
        for step in range(2, args.steps + 2):
            new = f"r{round_no}-s{args.seqs + step}"
            message = memory_pb2.StepRequest(
                pool_id=pool,
                step=step,
                free=[live[0]],
                allocate=[memory_pb2.Allocation(seq_id=new, num_tokens=args.prompt_tokens)],
                append=[memory_pb2.Append(seq_id=s, num_new_tokens=1) for s in live[1:]],
            )
            start = time.perf_counter()
            requests.put(message)
            next(answers)
            times.append(time.perf_counter() - start)
            live = live[1:] + [new]
        requests.put(None)
        stub.ReleasePool(memory_pb2.ReleasePoolRequest(pool_id=pool))
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per arm")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--num-blocks", type=int, default=4096)
    ap.add_argument("--event-log", action="store_true", help="the events arm also writes a JSON-lines log")
    ap.add_argument("--no-subscriber", action="store_true", help="events on, but nobody watching")
    add_quick_flag(ap, rounds=1, steps=at_most(20), seqs=at_most(4))
    args = apply_quick(ap.parse_args(argv))
    log_dir = tempfile.mkdtemp(prefix="events-overhead-")
    event_log = os.path.join(log_dir, "events.jsonl") if args.event_log else ""
    (on_proc, on), (off_proc, off) = start_memory(True, log_dir, event_log), start_memory(False, log_dir)
    counted = multiprocessing.Value("q", 0)
    watcher = multiprocessing.Process(target=subscribe, args=(on, counted), daemon=True)
    if not args.no_subscriber:
        watcher.start()
    times = {"on": [], "off": []}
    try:
        run_steps(on, args, -1), run_steps(off, args, -1)  # warm-up
        order = [arm for r in range(args.rounds) for arm in (("on", "off") if r % 2 == 0 else ("off", "on"))]
        for i, arm in enumerate(order):
            times[arm] += run_steps(on if arm == "on" else off, args, i)
    finally:
        if watcher.is_alive():
            watcher.terminate()
        stop_service(on_proc)
        stop_service(off_proc)
    p50 = {arm: float(np.median(t)) * 1000 for arm, t in times.items()}
    p99 = {arm: float(np.percentile(t, 99)) * 1000 for arm, t in times.items()}
    print(
        f"{len(times['on'])} steps per arm ({args.seqs} sequences, {args.rounds} alternating rounds), "
        f"{counted.value} events read by the subscriber{', logged to a file' if args.event_log else ''}"
    )
    print("| arm | step p50 (ms) | step p99 (ms) |\n| --- | --- | --- |")
    for arm, name in (("off", "events off"), ("on", "events on + subscriber")):
        print(f"| {name} | {p50[arm]:.3f} | {p99[arm]:.3f} |")
    print(f"events_step_ratio={p50['on'] / p50['off']:.3f}")


if __name__ == "__main__":
    main()
