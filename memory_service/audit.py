"""Replay a block-event log and check every invariant of the block bookkeeping.

    python -m memory_service.audit EVENTS.jsonl

Checks, per pool: no block owned twice (a block handed out as new while a table still points at
it), ref counts equal the number of tables that point at each block (every event that reports
`refs` is compared with the replay), a freed table is the table the replay holds, a cache hit is
a block that holds a hash, an evicted block is unreferenced and cached, every sequence still
holding blocks at a `snapshot` is one the memory service lists as live (else its blocks leaked),
its cached and hashed blocks at a `snapshot` are the replay's, event numbers go up by one (only
a `restart` may skip the numbers a killed process never wrote), and nothing happens to a pool
after it is released or the service restarted. With `--idle-at-end` (a run whose requests all
finished), every pool's last state must hold no sequence: a sequence the compute side never
freed shows there. Prints the first violation with its event number and step and exits 1; else
a summary (which names pools whose log ends without a closing snapshot: their last tables were
not cross-checked) and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from memory_service.block_events import (
    AllBlocksCleared,
    Allocate,
    Append,
    BlockEvent,
    BlockRemoved,
    BlockStored,
    Evict,
    Free,
    Missed,
    PoolRegistered,
    PoolReleased,
    Preempt,
    Restart,
    Snapshot,
    parse,
)
from memory_service.events import read_log


class Violation(Exception):
    pass


@dataclass
class PoolState:
    num_blocks: int
    tables: dict[str, list[int]] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)
    hashed: set[int] = field(default_factory=set)

    def holders(self, block: int) -> list[str]:
        return [s for s, t in self.tables.items() if block in t]

    def take_new(self, block: int, what: str) -> None:
        if self.refs.get(block, 0):
            raise Violation(f"block {block} owned twice: {what} takes it while {self.holders(block)} hold it")
        self.hashed.discard(block)  # new content (an evicted cached block has been reported first)
        self.refs[block] = 1

    def check_refs(self, reported_refs: list[int], blocks: list[int]) -> None:
        for block, reported in zip(blocks, reported_refs, strict=False):
            counted = sum(t.count(block) for t in self.tables.values())
            if reported != counted or self.refs.get(block, 0) != counted:
                raise Violation(
                    f"block {block}: ref count {reported} reported, {counted} tables point at it "
                    f"({self.holders(block)})"
                )


class Auditor:
    """Replays events one by one (`apply`), raising Violation at the first broken invariant."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolState] = {}
        self.dead: set[str] = set()
        self.events = 0
        self.last_seq = 0
        self.closed: set[str] = set()  # live pools whose latest event is a snapshot

    def apply(self, e: dict) -> None:
        kind, pool_id = e["type"], e.get("pool", "")
        self.events += 1
        try:
            record = parse(e)
        except KeyError:
            raise Violation(f"unknown event type {kind!r}, or a field of it is missing") from None
        if isinstance(record, Missed):
            raise Violation(f"{record.count} events are missing before this one: the log is incomplete")
        restart = isinstance(record, Restart)
        if self.last_seq and e["seq"] != self.last_seq + 1 and not (restart and e["seq"] > self.last_seq):
            raise Violation(f"event {e['seq']} follows event {self.last_seq}: the log is incomplete or out of order")
        self.last_seq = e["seq"]
        if pool_id:
            self.closed.discard(pool_id)
        if restart:  # every pool died with the old process
            self.dead.update(self.pools)
            self.pools.clear()
            return
        if pool_id in self.dead:
            raise Violation(f"{kind} in pool {pool_id}, which was released")
        if isinstance(record, PoolRegistered):
            self.pools[pool_id] = PoolState(record.num_blocks)
            return
        pool = self.pools.get(pool_id)
        if pool is None:
            raise Violation(f"{kind} in pool {pool_id!r}, which never registered")
        handler = self._HANDLERS.get(type(record))
        if handler is None:
            raise Violation(f"event type {kind!r} has no place in a pool's history")
        handler(self, pool, record)
        if isinstance(record, PoolReleased):
            del self.pools[pool_id]
            self.dead.add(pool_id)
        elif isinstance(record, Snapshot):
            self.closed.add(pool_id)

    def _allocate(self, pool: PoolState, e: Allocate) -> None:
        seq, blocks, hits = e.seq_id, e.blocks, e.hits
        if seq in pool.tables:
            raise Violation(f"sequence {seq} allocated while it already holds {pool.tables[seq]}")
        for block in blocks[:hits]:
            if block not in pool.hashed:
                raise Violation(f"sequence {seq} hit block {block}, which holds no cached prefix")
            pool.refs[block] = pool.refs.get(block, 0) + 1
        for block in blocks[hits:]:
            pool.take_new(block, f"sequence {seq}")
        pool.tables[seq] = list(blocks)
        pool.check_refs(e.refs, blocks)

    def _append(self, pool: PoolState, e: Append) -> None:
        seq = self._live(pool, e)
        for block in e.blocks:
            pool.take_new(block, f"sequence {seq}")
        pool.tables[seq] += e.blocks

    def _free(self, pool: PoolState, e: Free) -> None:  # and Preempt
        seq = self._live(pool, e)
        if pool.tables[seq] != e.blocks:
            raise Violation(f"{e.TYPE} of {seq}: table {e.blocks} reported, {pool.tables[seq]} replayed")
        for block in pool.tables.pop(seq):
            pool.refs[block] -= 1
        pool.check_refs(e.refs, e.blocks)

    def _stored(self, pool: PoolState, e: BlockStored) -> None:
        pool.hashed.update(e.blocks)

    def _evict(self, pool: PoolState, e: Evict) -> None:
        for block in e.blocks:
            if pool.refs.get(block, 0) or block not in pool.hashed:
                raise Violation(f"block {block} evicted while referenced by {pool.holders(block)} or not cached")

    def _unhashed(self, pool: PoolState, e: BlockRemoved | AllBlocksCleared) -> None:
        pool.hashed.difference_update(e.blocks)

    def _snapshot(self, pool: PoolState, e: Snapshot) -> None:
        for seq, table in pool.tables.items():
            if seq not in e.tables:
                raise Violation(
                    f"sequence {seq} still holds blocks {table}, but the memory service no longer lists it: they leaked"
                )
            if e.tables[seq] != table:
                raise Violation(f"sequence {seq}: table {e.tables[seq]} at the snapshot, {table} replayed")
        for seq in e.tables:
            if seq not in pool.tables:
                raise Violation(f"sequence {seq} is live at the snapshot but was never allocated in the log")
        if set(e.hashed) != pool.hashed:
            raise Violation(
                "blocks holding a hash at the snapshot differ from the replay: "
                f"{sorted(set(e.hashed) ^ pool.hashed)[:8]}"
            )
        parked = {b for b in pool.hashed if not pool.refs.get(b, 0)}
        if set(e.cached) != parked:
            raise Violation(
                "cached (unreferenced) blocks at the snapshot differ from the replay: "
                f"{sorted(set(e.cached) ^ parked)[:8]}"
            )

    def _released(self, pool: PoolState, e: PoolReleased) -> None:
        pass  # the whole pool goes: its tables with it (a lease that ran out is a release too)

    _HANDLERS: ClassVar[dict[type[BlockEvent], Callable]] = {
        Allocate: _allocate,
        Append: _append,
        Free: _free,
        Preempt: _free,
        BlockStored: _stored,
        Evict: _evict,
        BlockRemoved: _unhashed,
        AllBlocksCleared: _unhashed,
        Snapshot: _snapshot,
        PoolReleased: _released,
    }

    @staticmethod
    def _live(pool: PoolState, e: Append | Free) -> str:
        if e.seq_id not in pool.tables:
            raise Violation(f"{e.TYPE} of sequence {e.seq_id}, which holds no blocks (double free?)")
        return e.seq_id

    def check_idle(self) -> None:
        """At the end of a run whose requests all finished: no live pool holds a sequence."""
        for pool_id, pool in self.pools.items():
            if pool.tables:
                raise Violation(
                    f"pool {pool_id} still holds sequences {sorted(pool.tables)[:4]} at the end "
                    f"({len(pool.tables)} in all): they were never freed"
                )

    def summary(self) -> str:
        held = sum(len(p.tables) for p in self.pools.values())
        unclosed = sorted(set(self.pools) - self.closed)
        return (
            f"{self.events} events, {len(self.pools)} live pool(s), {held} live sequence(s) holding "
            f"{sum(sum(1 for r in p.refs.values() if r) for p in self.pools.values())} blocks, "
            f"{len(self.dead)} pool(s) released: every invariant holds"
            + (f"; the log ends without a closing snapshot of {', '.join(unclosed)}" if unclosed else "")
        )


def audit(events: list[dict], idle_at_end: bool = False) -> tuple[bool, str]:
    """(ok, message): the first violation with its event number and step, or the summary."""
    auditor = Auditor()
    event: dict = {"seq": 0, "type": "end"}
    try:
        for event in events:
            auditor.apply(event)
        if idle_at_end:
            event = {"seq": auditor.last_seq, "type": "end of the log"}
            auditor.check_idle()
    except Violation as v:
        return (
            False,
            f"violation at event {event['seq']} (step {event.get('step', 0)}, pool "
            f"{event.get('pool', '')}, {event['type']}): {v}",
        )
    return True, auditor.summary()


FREE, CACHED, USED, SHARED = range(4)  # as the block map page draws them


def replay(events: list[dict], upto_seq: int) -> Auditor:
    """The replayed state after the events numbered up to `upto_seq`."""
    auditor = Auditor()
    for event in events:
        if event["seq"] > upto_seq:
            break
        auditor.apply(event)
    return auditor


def replay_states(events: list[dict], upto_seq: int) -> dict[str, list[int]]:
    """Every live pool's block states after the events numbered up to `upto_seq` (the truth a
    block map showing that event number must equal)."""
    auditor = replay(events, upto_seq)
    return {
        pool_id: [
            SHARED
            if pool.refs.get(b, 0) > 1
            else USED
            if pool.refs.get(b, 0) == 1
            else CACHED
            if b in pool.hashed
            else FREE
            for b in range(pool.num_blocks)
        ]
        for pool_id, pool in auditor.pools.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="a JSON-lines event log (the memory service's --event-log)")
    ap.add_argument(
        "--idle-at-end",
        action="store_true",
        help="every request of the run finished: no pool may hold a sequence at the end",
    )
    args = ap.parse_args(argv)
    ok, message = audit(read_log(args.log), idle_at_end=args.idle_at_end)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
