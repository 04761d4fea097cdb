"""Block events: every change the memory service makes to a block, numbered, kept in a bounded
ring (from which a watcher resumes after a broken stream), optionally appended to a JSON-lines
file, and pushed to live subscribers (WatchEvents, the block map page).

The event types and their fields are memory_service.block_events' records. Every event carries
the envelope `seq` (one counter for the whole service, continued across restarts when a log file
is kept), `type`, `pool`, `replica`, `step` (the engine's step number) and `time`. A restart of
the service writes a `restart` event (every earlier pool is gone: its replicas register new
ones); `snapshot` events give whole pool states (at release and shutdown).
`memory_service/audit.py` replays a log and checks it.

Subscribers get one batch per step (the events a step made): a slow subscriber never slows a
step: each has a bounded queue; what does not fit is dropped and the subscriber is told how many
it missed (`missed` event) when it has caught up.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import deque
from typing import IO

from memory_service.block_allocator import BlockAllocator
from memory_service.block_events import (
    BlockEvent,
    Free,
    Missed,
    PoolRegistered,
    PoolReleased,
    Restart,
    Snapshot,
    Watching,
)

COALESCE_S = 0.02  # a watcher gets at most one message per 20 ms: it costs a fast step loop little
QUEUE_BATCHES = 1024  # batches a watcher may fall behind before it misses events
MAX_WATCHERS = 64  # watchers at once (the memory service's max_watchers): each queue is memory a caller holds
MAX_QUEUE_BATCHES = 4096  # the most a watcher may have queued (the memory service's max_watcher_queue)


class TooManyWatchers(RuntimeError):
    """Another watcher would pass the memory service's max_watchers."""


def marker(record: Watching | Missed, seq: int) -> dict:
    """An event that tells a watcher about its stream (`watching`, `missed`), never recorded:
    numbered as the last event it refers to."""
    return {
        "seq": seq,
        "type": record.TYPE,
        "pool": "",
        "replica": "",
        "step": 0,
        "time": time.time(),
        **record.fields(),
    }


class Subscription:
    """One subscriber's bounded queue of event batches (one batch per step). When it overflows,
    batches are dropped until the subscriber has read everything queued; it then gets one
    `missed` event (the count, numbered as the last event it missed) and the events from there on."""

    def __init__(self, maxsize: int, after_seq: int = 0) -> None:
        self.queue: asyncio.Queue[list[dict]] = asyncio.Queue(maxsize)
        self.after_seq = after_seq  # events up to here were recorded before it subscribed: not its
        self.missed = 0
        self._last_missed: dict | None = None

    def offer(self, batch: list[dict]) -> None:
        if batch[0]["seq"] <= self.after_seq:  # recorded before it subscribed, flushed after
            batch = [e for e in batch if e["seq"] > self.after_seq]
            if not batch:
                return
        if self.missed or self.queue.full():
            self.missed += len(batch)
            self._last_missed = batch[-1]
        else:
            self.queue.put_nowait(batch)

    async def get(self, coalesce_s: float = 0.0) -> list[dict]:
        """The next events, in order: every batch queued (after waiting `coalesce_s` for more, so
        a subscriber costs at most one message per `coalesce_s` however fast the steps come), then
        a `missed` event if some were dropped."""
        events: list[dict] = []
        if not (self.missed and self.queue.empty()):
            events += await self.queue.get()
            if coalesce_s:
                await asyncio.sleep(coalesce_s)
            while not self.queue.empty():
                events += self.queue.get_nowait()
        if self.missed and self.queue.empty():
            last, count = self._last_missed, self.missed
            self.missed, self._last_missed = 0, None
            events.append(marker(Missed(count), last["seq"]))
        return events


class EventRecorder:
    def __init__(
        self, ring_size: int = 65536, log_path: str = "", epoch: str = "", max_watchers: int = MAX_WATCHERS
    ) -> None:
        self.seq = 0
        self.max_watchers = max_watchers
        self.ring: deque[dict] = deque(maxlen=ring_size)
        self._subscribers: set[Subscription] = set()
        self._pending: list[dict] = []  # recorded since the last flush: one batch for subscribers and the file
        self._file: IO[str] | None = None
        if log_path:
            self.seq = _last_seq(log_path)
            self._file = open(log_path, "a", encoding="utf-8")
            if not _ends_with_newline(log_path):  # a line torn by a kill mid-write: end it, start clean
                self._file.write("\n")
        self.record(Restart(epoch), "", "", 0)
        self.flush()

    def record(self, record: BlockEvent, pool: str, replica: str, step: int) -> dict:
        """Number an event and keep it; subscribers and the file get it at the next flush (the
        memory service flushes after every step and every pool change)."""
        self.seq += 1
        event = {
            "seq": self.seq,
            "type": record.TYPE,
            "pool": pool,
            "replica": replica,
            "step": step,
            "time": time.time(),
            **record.fields(),
        }
        self.ring.append(event)
        self._pending.append(event)
        return event

    def attach(self, pool: str, replica: str, allocator: BlockAllocator) -> None:
        """Record a new pool, and every change its allocator makes from now on."""
        self.record(PoolRegistered(allocator.num_blocks, allocator.block_size), pool, replica, 0)
        allocator.listener = PoolEvents(self, pool, replica, allocator)

    def detach(self, pool: str, replica: str, allocator: BlockAllocator, reason: str) -> None:
        """The pool goes (released, or its lease ran out): its last state, then its end."""
        self.snapshot(pool, replica, allocator)
        self.record(PoolReleased(reason), pool, replica, allocator.step)
        allocator.listener = None

    def snapshot(self, pool: str, replica: str, allocator: BlockAllocator) -> dict:
        """Record a pool's whole state (before its release, and at shutdown)."""
        return self.record(pool_state(allocator), pool, replica, allocator.step)

    def current_snapshot(self, pool: str, replica: str, allocator: BlockAllocator) -> dict:
        """A pool's whole state now, not recorded: numbered as the last event it includes (what a
        new watcher or page starts from)."""
        return {
            "seq": self.seq,
            "type": Snapshot.TYPE,
            "pool": pool,
            "replica": replica,
            "step": allocator.step,
            "time": time.time(),
            **pool_state(allocator).fields(),
        }

    def flush(self) -> None:
        """Hand what was recorded since the last flush to every subscriber (one batch) and the file."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        for subscriber in self._subscribers:
            subscriber.offer(batch)
        if self._file is not None:
            self._file.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in batch))
            self._file.flush()

    def since(self, after_seq: int) -> list[dict]:
        """The events after `after_seq` up to now, from the ring: what a watcher that lost its
        stream at `after_seq` needs, with a subscription taken now, to resume with no gap or
        repeat. If the ring no longer holds them all, a `missed` event says how many are gone
        before the ones it still has."""
        if after_seq > self.seq:  # numbered by another process (restarted without a log): all we have
            after_seq = 0
        replay = [e for e in self.ring if e["seq"] > after_seq]
        first = replay[0]["seq"] if replay else self.seq + 1
        if first > after_seq + 1:
            replay.insert(0, marker(Missed(first - 1 - after_seq), first - 1))
        return replay

    @property
    def watchers_full(self) -> bool:
        return len(self._subscribers) >= self.max_watchers

    def subscribe(self, maxsize: int = QUEUE_BATCHES) -> Subscription:
        """A subscription to every event recorded from now on (a snapshot or `since` taken now
        covers the ones before, even those not flushed yet). TooManyWatchers past max_watchers:
        each one's queue is memory a caller makes the service hold."""
        if self.watchers_full:
            raise TooManyWatchers(f"the memory service serves its maximum of {self.max_watchers} event watchers")
        subscription = Subscription(maxsize, self.seq)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class PoolEvents:
    """The allocator's listener for one pool: stamps its events with the pool, the replica and
    the step being applied (memory_service.step sets `allocator.step`), and keeps what only
    the page needs and the clock-free allocator does not: when each table was made, and how
    many preemptions there were."""

    def __init__(self, recorder: EventRecorder, pool: str, replica: str, allocator: BlockAllocator) -> None:
        self.recorder, self.pool, self.replica, self.allocator = recorder, pool, replica, allocator
        self.created: dict[str, float] = {}
        self.preemptions = 0

    def __call__(self, record: BlockEvent) -> None:
        event = self.recorder.record(record, self.pool, self.replica, self.allocator.step)
        if record.TYPE == "allocate":
            self.created[event["seq_id"]] = event["time"]
        elif isinstance(record, Free):  # finished, or preempted
            self.created.pop(event["seq_id"], None)
            self.preemptions += record.TYPE == "preempt"


def pool_state(allocator: BlockAllocator) -> Snapshot:
    """A snapshot: the allocator's tables, tokens, cached and hashed blocks, and from the pool's
    start its prefix-cache counters, preemptions and when each table was made."""
    listener = allocator.listener if isinstance(allocator.listener, PoolEvents) else None
    stats = allocator.stats()
    return Snapshot(
        **allocator.snapshot(),
        created=dict(listener.created) if listener else {},
        preemptions=listener.preemptions if listener else 0,
        prefix_query_tokens=stats.prefix_query_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens,
    )


def _ends_with_newline(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


_SEQ_AT_LINE_START = re.compile(rb'(?:^|\n)\{"seq":(\d+),')


def _last_seq(path: str) -> int:
    """The last event number in an existing log (0 for none): numbering continues after it. Every
    line starts with its number, so this reads back from the end, in growing windows, until a
    line start is found (a closing snapshot of a big pool is a line of hundreds of kilobytes)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    size, window = os.path.getsize(path), 65536
    with open(path, "rb") as f:
        while True:
            f.seek(max(size - window, 0))
            found = _SEQ_AT_LINE_START.findall(f.read())
            if found:
                return int(found[-1])
            if window >= size:
                break
            window *= 8
    return 0


def read_log(path: str) -> list[dict]:
    """Every event in a JSON-lines log. A line that does not parse is accepted only where a kill
    can tear one, as the last line of the file or of a process (the next event is a `restart`);
    anywhere else the log is corrupt and this raises ValueError naming the line."""
    events: list[dict] = []
    torn: int | None = None  # the number of a line that did not parse, until a restart follows it
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if torn is not None and (event is None or event.get("type") != "restart"):
                raise ValueError(f"{path}:{torn}: not an event, and the next line is no restart")
            torn = number if event is None else None
            if event is not None:
                events.append(event)
    return events
