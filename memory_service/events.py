"""Block events: every change the memory service makes to a block, numbered, kept in a bounded
ring, optionally appended to a JSON-lines file, and pushed to live subscribers (WatchEvents, the
block map page).

Names follow vLLM's KV events where they mean the same (BlockStored with hashes, BlockRemoved,
AllBlocksCleared), beside the allocator's own: allocate, append, fork, cow, free, preempt, evict,
and the pools' pool_registered / pool_released. Every event carries `seq` (one counter for the
whole service, continued across restarts when a log file is kept), `type`, `pool`, `replica`,
`step` (the engine's step number) and `time`. A restart of the service writes a `restart` event
(every earlier pool is gone: its replicas register new ones); `snapshot` events give whole pool
states (at release and shutdown). `memory_service/audit.py` replays a log and checks it.

A slow subscriber never slows a step: each has a bounded queue; what does not fit is dropped and
the subscriber is told how many it missed (`missed` event) when there is room again.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from typing import IO

from memory_service.block_allocator import BlockAllocator


class Subscription:
    """One subscriber's bounded queue of events. When it overflows, events are dropped until the
    subscriber has read everything queued; it then gets one `missed` event (the count, numbered as
    the last event it missed) and the events from there on."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize)
        self.missed = 0
        self._last_missed: dict | None = None

    def offer(self, event: dict) -> None:
        if self.missed or self.queue.full():
            self.missed += 1
            self._last_missed = event
        else:
            self.queue.put_nowait(event)

    async def get(self) -> dict:
        if self.missed and self.queue.empty():
            last, count = self._last_missed, self.missed
            self.missed, self._last_missed = 0, None
            return {"seq": last["seq"], "type": "missed", "pool": "", "replica": "", "step": 0, "time": last["time"],
                    "count": count}
        return await self.queue.get()


class EventRecorder:
    def __init__(self, ring_size: int = 65536, log_path: str = "", epoch: str = "") -> None:
        self.seq = 0
        self.ring: deque[dict] = deque(maxlen=ring_size)
        self._subscribers: set[Subscription] = set()
        self._file: IO[str] | None = None
        if log_path:
            self.seq = _last_seq(log_path)
            self._file = open(log_path, "a", encoding="utf-8")
        self.record("restart", "", "", 0, {"epoch": epoch})

    def record(self, kind: str, pool: str, replica: str, step: int, fields: dict) -> dict:
        self.seq += 1
        event = {"seq": self.seq, "type": kind, "pool": pool, "replica": replica, "step": step,
                 "time": round(time.time(), 6), **fields}
        self.ring.append(event)
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        for subscriber in self._subscribers:
            subscriber.offer(event)
        return event

    def attach(self, pool: str, replica: str, allocator: BlockAllocator) -> None:
        """Record a new pool, and every change its allocator makes from now on."""
        self.record("pool_registered", pool, replica, 0,
                    {"num_blocks": allocator.num_blocks, "block_size": allocator.block_size})
        allocator.listener = PoolEvents(self, pool, replica, allocator)

    def detach(self, pool: str, replica: str, allocator: BlockAllocator, reason: str) -> None:
        """The pool goes (released, or its lease ran out): its last state, then its end."""
        self.snapshot(pool, replica, allocator)
        self.record("pool_released", pool, replica, allocator.step, {"reason": reason})
        allocator.listener = None

    def snapshot(self, pool: str, replica: str, allocator: BlockAllocator) -> dict:
        return self.record("snapshot", pool, replica, allocator.step, allocator.snapshot())

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def subscribe(self, maxsize: int = 4096) -> Subscription:
        subscription = Subscription(maxsize)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class PoolEvents:
    """The allocator's listener for one pool: stamps its events with the pool, the replica and
    the step being applied (memory_service.step sets `allocator.step`)."""

    def __init__(self, recorder: EventRecorder, pool: str, replica: str, allocator: BlockAllocator) -> None:
        self.recorder, self.pool, self.replica, self.allocator = recorder, pool, replica, allocator

    def __call__(self, kind: str, fields: dict) -> None:
        for key in ("seq_id", "parent"):
            if key in fields:
                fields[key] = str(fields[key])
        self.recorder.record(kind, self.pool, self.replica, self.allocator.step, fields)


def _last_seq(path: str) -> int:
    """The last event number in an existing log (0 for none): numbering continues after it."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 65536, 0))
        lines = [line for line in f.read().splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            return int(json.loads(line)["seq"])
        except (ValueError, KeyError):
            continue
    return 0


def read_log(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
