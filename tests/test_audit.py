"""The block-event audit (memory_service/audit.py): it passes real logs and catches each planted
fault, naming the event and step where it happens."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.local_engine import LocalEngine
from common.sampling_params import SamplingParams
from memory_service.audit import FREE, audit, replay_states
from memory_service.block_allocator import BlockAllocator
from memory_service.block_events import PoolRegistered
from memory_service.events import EventRecorder, read_log


def event(seq: int, kind: str, **fields) -> dict:
    return {"seq": seq, "type": kind, "pool": "p", "replica": "r", "step": seq * 10, "time": 0.0, **fields}


def snapshot(seq: int, tables: dict, tokens: dict, cached: list, hashed: list) -> dict:
    """A snapshot event as the memory service writes it (the audit reads its tables and blocks)."""
    return event(
        seq,
        "snapshot",
        num_blocks=8,
        block_size=4,
        tables=tables,
        tokens=tokens,
        cached=cached,
        hashed=hashed,
        created={},
        preemptions=0,
        prefix_query_tokens=0,
        prefix_hit_tokens=0,
    )


def log(*events: dict) -> list[dict]:
    return [event(1, "restart", epoch="e"), event(2, "pool_registered", num_blocks=8, block_size=4), *events]


def test_planted_double_allocation_is_caught_at_its_event():
    ok, message = audit(
        log(
            event(3, "allocate", seq_id="a", blocks=[0, 1], hits=0, tokens=8, refs=[1, 1]),
            event(4, "allocate", seq_id="b", blocks=[1, 2], hits=0, tokens=8, refs=[1, 1]),
        )
    )
    assert not ok and "event 4 (step 40" in message and "block 1 owned twice" in message and "['a']" in message


def test_planted_leaked_block_is_caught_at_the_snapshot():
    ok, message = audit(
        log(
            event(3, "allocate", seq_id="a", blocks=[0, 1], hits=0, tokens=8, refs=[1, 1]),
            event(4, "allocate", seq_id="b", blocks=[2], hits=0, tokens=3, refs=[1]),
            event(5, "free", seq_id="b", blocks=[2], refs=[0]),
            snapshot(6, tables={}, tokens={}, cached=[], hashed=[]),
        )
    )
    assert not ok and "event 6" in message and "sequence a still holds blocks [0, 1]" in message and "leaked" in message


def test_planted_wrong_ref_count_is_caught():
    ok, message = audit(
        log(
            event(3, "allocate", seq_id="a", blocks=[0, 1], hits=0, tokens=8, refs=[1, 1]),
            event(4, "BlockStored", seq_id="a", blocks=[0], hashes=["aa"]),
            event(5, "allocate", seq_id="b", blocks=[0, 2], hits=1, tokens=8, refs=[1, 1]),
        )
    )
    assert not ok and "event 5" in message and "block 0: ref count 1 reported, 2 tables point at it" in message


@pytest.mark.parametrize(
    "fault,expected",
    [
        (event(4, "free", seq_id="zz", blocks=[0], refs=[0]), "double free"),
        (event(4, "allocate", seq_id="b", blocks=[3, 4], hits=1, tokens=8, refs=[1, 1]), "holds no cached prefix"),
        (event(4, "evict", blocks=[0]), "evicted while referenced"),
    ],
)
def test_other_planted_faults(fault, expected):
    ok, message = audit(log(event(3, "allocate", seq_id="a", blocks=[0, 1], hits=0, tokens=8, refs=[1, 1]), fault))
    assert not ok and expected in message


def test_an_event_in_a_released_pool_is_caught():
    ok, message = audit(
        log(
            snapshot(3, tables={}, tokens={}, cached=[], hashed=[]),
            event(4, "pool_released", reason="expired"),
            event(5, "allocate", seq_id="a", blocks=[0], hits=0, tokens=2, refs=[1]),
        )
    )
    assert not ok and "which was released" in message


def recorded_run(path: str) -> LocalEngine:
    """Shared prefixes, n=2 (samples sharing their prompt), a pool small enough to preempt and
    evict, and an abort: the engine's own log."""
    engine = LocalEngine(
        model="dummy:tiny", block_size=16, kv_budget_tokens=512, max_num_seqs=16, headroom_blocks_per_seq=0
    )
    recorder = EventRecorder(log_path=path)
    recorder.attach("local", "in-process", engine.allocator)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 50000, size=40).tolist()
    ids = [
        engine.add_request(
            prefix + rng.integers(0, 50000, size=int(n)).tolist(),
            SamplingParams(max_new_tokens=40, temperature=1.0, n=2 if i % 3 == 0 else 1, ignore_eos=True),
        )
        for i, n in enumerate(rng.integers(1, 60, size=14))
    ]
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        if step == 5:
            engine.abort(ids[1])
    recorder.snapshot("local", "in-process", engine.allocator)
    recorder.close()
    return engine


def test_a_real_run_with_preemption_samples_and_an_abort_passes_and_a_dropped_free_is_caught(tmp_path):
    path = tmp_path / "events.jsonl"
    engine = recorded_run(str(path))
    assert engine.scheduler.num_preemptions > 0
    events = read_log(str(path))
    kinds = {e["type"] for e in events}
    assert {"allocate", "append", "free", "preempt", "evict", "BlockStored"} <= kinds
    assert all(e["step"] > 0 for e in events if e["type"] == "allocate")
    ok, message = audit(events)
    assert ok, message
    out = subprocess.run([sys.executable, "-m", "memory_service.audit", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "every invariant holds" in out.stdout
    # the run finished every request: its log also passes with --idle-at-end
    out = subprocess.run(
        [sys.executable, "-m", "memory_service.audit", "--idle-at-end", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    # drop one free: its sequence's blocks are held by nobody the service lists any more
    frees = [i for i, e in enumerate(events) if e["type"] == "free"]
    broken = [e for i, e in enumerate(events) if i != frees[-1]]
    for number, e in enumerate(broken, 1):  # numbered without the gap: only the leak can give it away
        e["seq"] = number
    path.write_text("".join(json.dumps(e) + "\n" for e in broken))
    out = subprocess.run([sys.executable, "-m", "memory_service.audit", str(path)], capture_output=True, text=True)
    assert out.returncode == 1 and "violation at event" in out.stderr and "leaked" in out.stderr


def test_numbering_continues_across_restarts_of_the_log(tmp_path):
    path = str(tmp_path / "events.jsonl")
    first = EventRecorder(log_path=path, epoch="one")
    first.record(PoolRegistered(num_blocks=4, block_size=4), "p", "r", 0)
    first.close()
    second = EventRecorder(log_path=path, epoch="two")
    second.close()
    events = read_log(path)
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert [e["type"] for e in events] == ["restart", "pool_registered", "restart"] and events[2]["epoch"] == "two"
    assert audit(events)[0]


def test_a_line_torn_by_a_kill_is_ended_at_the_restart_and_corruption_elsewhere_is_refused(tmp_path):
    path = tmp_path / "events.jsonl"
    first = EventRecorder(log_path=str(path), epoch="one")
    first.record(PoolRegistered(num_blocks=4, block_size=4), "p", "r", 0)
    first.close()
    with open(path, "a") as f:
        f.write('{"seq":3,"type":"allo')  # SIGKILL in the middle of a write
    EventRecorder(log_path=str(path), epoch="two").close()
    events = read_log(str(path))
    # the torn event's number is not used again; the restart may skip it, nothing else may
    assert [(e["seq"], e["type"]) for e in events] == [(1, "restart"), (2, "pool_registered"), (4, "restart")]
    assert audit(events)[0]
    with open(path, "a") as f:  # a bad line that no restart follows is corruption, not a kill
        f.write('{"seq":4,"type":"x"}\nnot json\n{"seq":5,"type":"x"}\n')
    with pytest.raises(ValueError, match=r"events.jsonl:6"):
        read_log(str(path))


def test_a_gap_in_the_numbering_is_caught():
    ok, message = audit(
        log(
            event(3, "allocate", seq_id="a", blocks=[0], hits=0, tokens=2, refs=[1]),
            event(5, "free", seq_id="a", blocks=[0], refs=[0]),
        )
    )
    assert not ok and "event 5 follows event 3" in message


def test_a_sequence_the_compute_side_never_freed_is_caught_at_the_end_of_a_finished_run():
    """The memory service lists it at its closing snapshot, so only --idle-at-end can tell."""
    events = log(
        event(3, "allocate", seq_id="a", blocks=[0, 1], hits=0, tokens=8, refs=[1, 1]),
        snapshot(4, tables={"a": [0, 1]}, tokens={"a": 8}, cached=[], hashed=[]),
    )
    assert audit(events)[0]
    ok, message = audit(events, idle_at_end=True)
    assert not ok and "still holds sequences ['a']" in message and "never freed" in message
    ok, message = audit(events[:-1])  # no closing snapshot: said, not hidden
    assert ok and "ends without a closing snapshot of p" in message


def test_clearing_the_cache_while_blocks_are_in_use_leaves_them_free_after_their_free(tmp_path):
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    recorder = EventRecorder(log_path=str(tmp_path / "events.jsonl"))
    recorder.attach("p", "r", allocator)
    allocator.allocate("a", 9, block_hashes=[b"h1", b"h2"])
    allocator.commit("a", 0, [b"h1", b"h2"])
    allocator.allocate("b", 4)
    allocator.free("b")
    # "a" still holds its two hashed blocks when the cache is reset
    allocator.reset_prefix_cache()
    allocator.free("a")
    recorder.snapshot("p", "r", allocator)
    recorder.close()
    events = read_log(str(tmp_path / "events.jsonl"))
    ok, message = audit(events, idle_at_end=True)
    assert ok, message
    assert set(replay_states(events, events[-1]["seq"])["p"]) == {FREE}
