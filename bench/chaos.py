"""Chaos run: faults must change no token a client receives.

    python -m bench.chaos                      # the goal run: 200 requests, 4 replica kills, 1 pause, 2 memory restarts
    python -m bench.chaos --num-requests 40 --faults kill=1,pause=1,memory=1 --fault-seed 3

Starts memory + 2 compute replicas + gateway on loopback (the default model unless --model),
runs a fixed seeded workload (greedy and seeded-sampling requests of mixed lengths that fit the
model's context, half with stop strings, a third free to end by EOS) once without faults to record every request's
tokens, then again while a seeded schedule SIGKILLs compute replicas (each restarted at once),
SIGSTOPs one past its lease (then SIGCONT), and SIGKILLs and restarts the memory service, spread
over the run. The gateway's query-of-death rule is set past the number of replica faults (faults
that strike replicas whatever runs there are not a request's doing; with the default of 2 deaths,
a request struck twice would be failed, as the rule says). It never takes both replicas down at
once: the next fault waits until every
service serves again.
The memory service writes its block events to `<log-dir>/events.jsonl` (numbered on across its
restarts), and the run ends by auditing it (memory_service.audit: no block owned twice, ref
counts equal the tables, nothing leaked, nothing in a dead pool, and with every request finished
no pool holds a sequence at the end). Ends with one line:
    requests=N completed=N failed=N token_mismatches=N leaked_blocks=N max_stall_s=X audit=passed|failed
leaked_blocks: after the run settles, blocks still in use in any pool, plus every block of a pool
whose replica is gone (a dead pool must be released). max_stall_s: the longest a client waited
for its next token (or its first).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from bench.quick import add_quick_flag, apply_quick, at_most, scratch_dir
from bench.workloads import served_model_limits
from deploy.run_local import running_stack, start_serving, wait_serving
from deploy.services import free_ports, local_services
from gateway.client import stream_generate
from memory_service.audit import audit
from memory_service.events import read_log
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

STOPS = [".", "\n\n", ",", "!"]


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    error: str = ""
    max_gap_s: float = 0.0


def workload(n: int, seed: int, context_length: int) -> list[tuple[list[int], dict]]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt_len = rng.randint(4, 96)
        max_new = min(rng.randint(32, 320), context_length - prompt_len)
        params = dict(max_new_tokens=max_new, ignore_eos=i % 3 != 0)  # a third may end by EOS
        if i % 2:
            params.update(temperature=0.8, top_k=40, seed=rng.randrange(2**31))
        else:
            params.update(temperature=0.0)
        if i % 4 in (1, 2):
            params["stop"] = [rng.choice(STOPS)]
        requests.append(([rng.randrange(50000) for _ in range(prompt_len)], params))
    return requests


def run_workload(gateway: str, requests, concurrency: int) -> list[Outcome]:
    outcomes = [Outcome() for _ in requests]

    def one(i: int) -> None:
        prompt, params = requests[i]
        out, last = outcomes[i], time.monotonic()
        try:
            for response in stream_generate(gateway, prompt, timeout_s=600, **params):
                if response.HasField("chunk"):
                    now = time.monotonic()
                    if response.chunk.token_ids:
                        out.max_gap_s, last = max(out.max_gap_s, now - last), now
                    out.tokens.extend(response.chunk.token_ids)
                    out.text += response.chunk.text
        except grpc.RpcError as exc:
            out.error = f"{exc.code().name}: {exc.details()}"

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(requests))))
    return outcomes


class FaultSchedule(threading.Thread):
    """Injects the faults, one at a time, spread over the run, in a seeded order."""

    def __init__(self, stack: dict, faults: dict[str, int], seed: int, lease_s: float, every_s: float) -> None:
        super().__init__(daemon=True)
        events = [kind for kind, n in faults.items() for _ in range(n)]
        random.Random(seed).shuffle(events)
        self.events, self.stack, self.lease_s, self.every_s = events, stack, lease_s, every_s
        self.rng = random.Random(seed + 1)
        self.done = threading.Event()  # every fault injected, every service serving again
        self.release = threading.Event()  # the run is over: this thread may end
        self.log: list[tuple[str, float, float]] = []  # (kind, when, how long it took)
        self.t0 = time.monotonic()

    def run(self) -> None:
        for kind in self.events:
            time.sleep(self.every_s)
            self._wait_all_serving()
            started = time.monotonic()
            getattr(self, f"_{kind}")()
            self.log.append((kind, started - self.t0, time.monotonic() - started))
        self._wait_all_serving()
        self.done.set()
        # The services restarted here die with this thread (PR_SET_PDEATHSIG is per thread): it
        # stays alive until the run is over.
        self.release.wait()

    def _proc(self, index: int):
        return self.stack["procs"][index]

    def _restart(self, index: int) -> None:
        self.stack["procs"][index] = start_serving(self.stack["services"][index], self.stack["log_dir"], 120)

    def _kill(self) -> None:
        index = self.rng.choice([1, 2])
        os.killpg(self._proc(index).pid, signal.SIGKILL)
        self._proc(index).wait()
        self._restart(index)

    def _pause(self) -> None:
        proc = self._proc(self.rng.choice([1, 2]))
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(self.lease_s + 2.0)
        os.killpg(proc.pid, signal.SIGCONT)

    def _memory(self) -> None:
        os.killpg(self._proc(0).pid, signal.SIGKILL)
        self._proc(0).wait()
        time.sleep(1.0)
        self._restart(0)

    def _wait_all_serving(self) -> None:
        for index in (0, 1, 2):
            spec = self.stack["services"][index]
            wait_serving(spec.port, spec.health_service, 120, self._proc(index))


def leaked_blocks(memory: str, replicas: list[str], settle_s: float) -> int:
    """Blocks held once everything has settled (waits up to `settle_s` for leases to run out):
    blocks in use in any pool, plus every block of a pool beyond one per live replica (the pool
    of a dead incarnation that was never released)."""
    deadline = time.monotonic() + settle_s
    with grpc.insecure_channel(memory) as channel:
        stub = memory_pb2_grpc.MemoryServiceStub(channel)
        while True:
            pools = stub.Stats(memory_pb2.StatsRequest(), timeout=5).pools
            leaked = sum(p.num_used_blocks for p in pools)
            for name in {p.replica for p in pools}:
                extra = (
                    [p for p in pools if p.replica == name][1:]
                    if name in replicas
                    else [p for p in pools if p.replica == name]
                )
                leaked += sum(p.num_blocks for p in extra)
            if leaked == 0 or time.monotonic() > deadline:
                return leaked
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="the workload's")
    ap.add_argument("--faults", default="kill=4,pause=1,memory=2")
    ap.add_argument("--fault-seed", type=int, default=0)
    ap.add_argument(
        "--fault-every-s",
        type=float,
        default=0.0,
        help="time between two faults; 0 = the fault-free run's duration / (faults + 4), so that "
        "every fault (each takes seconds) strikes while requests are in flight",
    )
    ap.add_argument("--model", default="shakespeare")
    ap.add_argument("--lease-ttl-s", type=float, default=3.0)
    ap.add_argument("--log-dir", default="/tmp/chaos-logs")
    add_quick_flag(
        ap,
        num_requests=at_most(16),
        concurrency=at_most(4),
        faults="kill=1,pause=1,memory=1",
        lease_ttl_s=1.0,
        model="dummy:tiny",
        log_dir=scratch_dir(),
    )
    args = apply_quick(ap.parse_args(argv))
    faults = {k: int(v) for k, v in (item.split("=") for item in args.faults.split(",") if item)}
    os.makedirs(args.log_dir, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # two replicas share this machine's cores: one torch thread each
    ports = free_ports(7)
    services = local_services(
        ports[0],
        (ports[1], ports[2]),
        ports[3],
        ports[4],
        ports[5],
        compute_settings={"model": args.model, "kv_budget_tokens": "8192"},
        gateway_http_port=ports[6],
    )
    services[0].settings["lease_ttl_s"] = str(args.lease_ttl_s)
    event_log = os.path.join(args.log_dir, "events.jsonl")
    if os.path.exists(event_log):
        os.remove(event_log)  # this run's events only
    services[0].settings["event_log"] = event_log
    # The kills and pauses strike replicas whatever runs there, every few seconds: a request that two
    # of them strike is no query of death, and this run is about what faults do to tokens. So the
    # query-of-death rule (default 2 deaths) is set past the number of replica faults.
    replica_faults = faults.get("kill", 0) + faults.get("pause", 0)
    services[-1].settings.update(
        health_poll_s="0.2",
        replica_down_after_s="1.0",
        replica_wait_s="120",
        max_replica_deaths=str(replica_faults + 1),
    )
    with running_stack(services, timeout_s=300, log_dir=args.log_dir) as procs:
        stack = dict(services=services, procs=procs, log_dir=args.log_dir)
        gateway, memory = f"127.0.0.1:{ports[3]}", f"127.0.0.1:{ports[0]}"
        requests = workload(args.num_requests, args.seed, served_model_limits(gateway).context_length)
        started = time.monotonic()
        reference = run_workload(gateway, requests, args.concurrency)
        print(
            f"fault-free run: {time.monotonic() - started:.0f} s, "
            f"{sum(len(o.tokens) for o in reference)} tokens, {sum(bool(o.error) for o in reference)} failed",
            file=sys.stderr,
        )
        every_s = args.fault_every_s or (time.monotonic() - started) / (sum(faults.values()) + 4)
        schedule = FaultSchedule(stack, faults, args.fault_seed, args.lease_ttl_s, every_s)
        schedule.t0 = started = time.monotonic()
        schedule.start()
        outcomes = run_workload(gateway, requests, args.concurrency)
        finished = time.monotonic() - started
        print(f"faults run: {finished:.0f} s; faults every {every_s:.1f} s", file=sys.stderr)
        schedule.done.wait()  # faults not injected yet (a short run) still happen, then everything settles
        print(
            "faults: " + "; ".join(f"{kind} at +{at:.1f}s ({took:.1f}s)" for kind, at, took in schedule.log),
            file=sys.stderr,
        )
        during = sum(at < finished for _, at, _ in schedule.log)
        leaked = leaked_blocks(memory, [s.settings["replica"] for s in services[1:3]], args.lease_ttl_s * 3 + 10)
        schedule.release.set()
    failed = sum(bool(o.error) for o in outcomes)
    mismatches = sum(
        not o.error and (o.tokens, o.text) != (r.tokens, r.text) for o, r in zip(outcomes, reference, strict=False)
    )
    # the stack has stopped, so the log is complete; every request finished, so no pool may hold a sequence
    audit_ok, audit_message = audit(read_log(event_log), idle_at_end=True)
    print(f"audit of {event_log}: {audit_message}", file=sys.stderr)
    for o in outcomes:
        if o.error:
            print("failed:", o.error, file=sys.stderr)
    print(
        f"{during} of {len(schedule.log)} faults struck while requests were in flight; the stall bound is the "
        f"lease ({args.lease_ttl_s:.1f} s) + the memory service's downtime (up to "
        f"{max([t for k, _, t in schedule.log if k == 'memory'], default=0):.1f} s) + recomputing a context",
        file=sys.stderr,
    )
    print(
        f"requests={len(requests)} completed={len(requests) - failed} failed={failed} token_mismatches={mismatches} "
        f"leaked_blocks={leaked} max_stall_s={max(o.max_gap_s for o in outcomes):.2f} "
        f"audit={'passed' if audit_ok else 'failed'}"
    )
    return 0 if failed == mismatches == leaked == 0 and audit_ok else 1


if __name__ == "__main__":
    sys.exit(main())
