"""WatchEvents on a live memory service: every event of a run reaches two subscribers at once, in
order, numbered without gaps; a subscriber that stops reading never holds up a step and is told
how many events it missed."""

from __future__ import annotations

import json
import re
import threading

import grpc
import pytest

from deploy.run_local import start_serving, stop_service
from deploy.services import ServiceSpec, free_ports
from memory_service.audit import audit
from memory_service.block_events import Append
from memory_service.events import EventRecorder, read_log
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc

STEPS = 400


@pytest.fixture
def memory(tmp_path):
    port, metrics = free_ports(2)
    spec = ServiceSpec(
        "memory",
        "memory",
        "memory_service.server",
        port,
        "rpc.internal.v1.MemoryService",
        {"metrics_port": str(metrics), "http_port": "0", "event_log": str(tmp_path / "events.jsonl")},
    )
    proc = start_serving(spec, str(tmp_path), timeout_s=60)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield memory_pb2_grpc.MemoryServiceStub(channel)
    stop_service(proc)


def steps(pool_id: str):
    """Sequences that come (8 tokens), grow a token a step, and go after 10 steps."""
    for step in range(1, STEPS + 1):
        yield memory_pb2.StepRequest(
            pool_id=pool_id,
            step=step,
            allocate=[memory_pb2.Allocation(seq_id=f"s{step}", num_tokens=8)],
            append=[memory_pb2.Append(seq_id=f"s{s}", num_new_tokens=1) for s in range(max(1, step - 9), step)],
            free=[f"s{step - 10}"] if step > 10 else [],
            preempted=[f"s{step - 10}"] if step % 7 == 0 else [],
        )


def watch(
    stub, events: list, request: memory_pb2.WatchEventsRequest, ready: threading.Event, stop_after: int | None = None
) -> None:
    stream = stub.WatchEvents(request, timeout=60)
    assert json.loads(next(stream).json)[0]["type"] == "watching"
    ready.set()
    for batch in stream:
        events.extend(json.loads(batch.json))
        if stop_after is not None and events[-1]["type"] == "pool_released":
            stream.cancel()
            return


def test_two_watchers_get_every_event_in_order_and_a_slow_one_is_told_what_it_missed(memory, tmp_path):
    stub = memory
    fast: list[list] = [[], []]
    threads, slow_events = [], []
    for events in fast:
        ready = threading.Event()
        threads.append(threading.Thread(target=watch, args=(stub, events, memory_pb2.WatchEventsRequest(), ready, 1)))
        threads[-1].start()
        ready.wait()
    slow = stub.WatchEvents(memory_pb2.WatchEventsRequest(max_queue=4), timeout=60)  # not read during the run
    assert json.loads(next(slow).json)[0]["type"] == "watching"
    pool_id = stub.RegisterPool(memory_pb2.RegisterPoolRequest(num_blocks=64, block_size=4, replica="r")).pool_id
    answers = list(stub.StepStream(steps(pool_id), timeout=30))  # completes although `slow` reads nothing
    assert len(answers) == STEPS and not any(a.rejected for a in answers)
    stub.ReleasePool(memory_pb2.ReleasePoolRequest(pool_id=pool_id))
    for t in threads:
        t.join(timeout=30)
    numbers = [e["seq"] for e in fast[0]]
    assert numbers == [e["seq"] for e in fast[1]] and [e["type"] for e in fast[0]] == [e["type"] for e in fast[1]]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # in order, no gaps
    kinds = [e["type"] for e in fast[0]]
    assert kinds[0] == "pool_registered" and kinds[-1] == "pool_released" and "preempt" in kinds
    assert len(fast[0]) > 3 * STEPS
    steps_seen = [e["step"] for e in fast[0] if e["type"] == "allocate"]
    assert steps_seen == list(range(1, STEPS + 1))  # each event carries the engine's step
    # the same run, from the log: every event the watchers saw, and the audit passes
    logged = read_log(str(tmp_path / "events.jsonl"))
    assert [e["seq"] for e in logged if e["seq"] >= numbers[0]] == numbers
    assert audit(logged)[0]
    allocation = next(e for e in fast[0] if e["type"] == "allocate")
    assert allocation["hits"] == 0 and allocation["tokens"] == 8 and allocation["refs"] == [1, 1]
    # the slow watcher: what fit its queue of 4 steps (and gRPC's buffers), a `missed` event for each gap, and
    # together they account for every event of the run
    for batch in slow:  # until the last event of the run, received or counted as missed
        slow_events.extend(json.loads(batch.json))
        if slow_events[-1]["seq"] >= numbers[-1]:
            break
    slow.cancel()
    covered, gaps = [], 0
    for event in slow_events:
        if event["type"] == "missed":
            covered += range(event["seq"] - event["count"] + 1, event["seq"] + 1)
            gaps += 1
        else:
            covered.append(event["seq"])
    assert gaps >= 1 and covered == numbers
    # a watcher that lost its stream resumes from the ring: exactly the events after its last one
    middle = numbers[len(numbers) // 2]
    resumed = stub.WatchEvents(memory_pb2.WatchEventsRequest(after_seq=middle), timeout=60)
    first = json.loads(next(resumed).json)
    resumed.cancel()
    assert first[0]["type"] == "watching" and first[0]["seq"] == numbers[-1]
    assert first[1:] == [e for e in fast[0] if e["seq"] > middle]


APPEND = Append(seq_id="s", blocks=[], tokens=0)


def test_resuming_past_the_ring_is_told_what_is_gone_and_events_before_subscribing_are_not_repeated():
    recorder = EventRecorder(ring_size=10)  # event 1 is its `restart`
    for i in range(25):
        recorder.record(APPEND, "p", "r", i)
    recorder.flush()
    replay = recorder.since(3)
    assert replay[0]["type"] == "missed" and (replay[0]["seq"], replay[0]["count"]) == (16, 13)
    assert [e["seq"] for e in replay[1:]] == list(range(17, 27))
    assert [e["seq"] for e in recorder.since(20)] == list(range(21, 27)) and recorder.since(26) == []
    recorder.record(APPEND, "p", "r", 26)  # recorded, not flushed yet
    subscription = recorder.subscribe(4)  # a snapshot taken now includes event 27 already
    recorder.record(APPEND, "p", "r", 27)
    recorder.flush()
    assert [e["seq"] for e in subscription.queue.get_nowait()] == [28]
    assert [e["seq"] for e in recorder.since(26)] == [27, 28]


def test_the_block_map_page_reads_only_event_types_and_fields_the_records_define():
    """The page's script (assets/block_map.html) dispatches on event types and reads their fields
    by name; memory_service.block_events is where those names are defined."""
    from pathlib import Path

    from memory_service.block_events import ENVELOPE, EVENT_TYPES, field_names

    script = (Path(__file__).resolve().parents[1] / "memory_service" / "assets" / "block_map.html").read_text()
    types = set(re.findall(r'case "(\w+)"', script)) | set(re.findall(r'e\.type === "(\w+)"', script))
    assert types and types <= set(EVENT_TYPES), types - set(EVENT_TYPES)
    read = set(re.findall(r"\be\.(\w+)", script))
    known = set(ENVELOPE) | {name for cls in EVENT_TYPES.values() for name in field_names(cls)}
    assert read and read <= known, read - known
