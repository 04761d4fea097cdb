"""The block events, as typed records: one dataclass per event type, the one source of their
field names for the allocator that emits them, the recorder that numbers and logs them
(memory_service.events), the audit that replays a log (memory_service.audit) and the block map
page (tests/test_block_map_page.py checks the fields its script reads exist here).

On the wire and in the log an event is a JSON object: the envelope every event carries (seq,
type, pool, replica, step, time) followed by its record's fields, in this order. Names follow
vLLM's KV events where they mean the same (BlockStored with hashes, BlockRemoved,
AllBlocksCleared), beside the allocator's own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cache
from typing import ClassVar

ENVELOPE = ("seq", "type", "pool", "replica", "step", "time")


@dataclass(frozen=True)
class BlockEvent:
    TYPE: ClassVar[str] = ""

    def fields(self) -> dict:
        """The record's fields, as the log writes them after the envelope (shallow: no copies)."""
        return {name: getattr(self, name) for name in field_names(type(self))}


@cache
def field_names(cls: type[BlockEvent]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


# ---- emitted by the allocator (block bookkeeping) --------------------------------------------
@dataclass(frozen=True)
class Allocate(BlockEvent):
    """A sequence's table made at admission: its first `hits` blocks were found cached."""

    TYPE: ClassVar[str] = "allocate"
    seq_id: str
    blocks: list[int]
    hits: int
    tokens: int
    refs: list[int]  # each block's ref count after the event


@dataclass(frozen=True)
class Append(BlockEvent):
    TYPE: ClassVar[str] = "append"
    seq_id: str
    blocks: list[int]  # new blocks at the end of its table
    tokens: int


@dataclass(frozen=True)
class Free(BlockEvent):
    """A sequence's table dropped because it finished (or was aborted)."""

    TYPE: ClassVar[str] = "free"
    seq_id: str
    blocks: list[int]
    refs: list[int]


@dataclass(frozen=True)
class Preempt(Free):
    """A sequence's table dropped by preemption (it is recomputed later)."""

    TYPE: ClassVar[str] = "preempt"


@dataclass(frozen=True)
class Evict(BlockEvent):
    TYPE: ClassVar[str] = "evict"
    blocks: list[int]  # cached, unreferenced blocks taken for new content


@dataclass(frozen=True)
class BlockStored(BlockEvent):
    """Full blocks a forward wrote became matchable under their hashes (hex)."""

    TYPE: ClassVar[str] = "BlockStored"
    seq_id: str
    blocks: list[int]
    hashes: list[str]


@dataclass(frozen=True)
class BlockRemoved(BlockEvent):
    TYPE: ClassVar[str] = "BlockRemoved"
    blocks: list[int]
    hashes: list[str]


@dataclass(frozen=True)
class AllBlocksCleared(BlockEvent):
    TYPE: ClassVar[str] = "AllBlocksCleared"
    blocks: list[int]  # every block that held a hash


# ---- recorded by the memory service (pools, restarts) ----------------------------------------
@dataclass(frozen=True)
class Restart(BlockEvent):
    TYPE: ClassVar[str] = "restart"
    epoch: str


@dataclass(frozen=True)
class PoolRegistered(BlockEvent):
    TYPE: ClassVar[str] = "pool_registered"
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class PoolReleased(BlockEvent):
    TYPE: ClassVar[str] = "pool_released"
    reason: str  # released | expired


@dataclass(frozen=True)
class Snapshot(BlockEvent):
    """A pool's whole state (memory_service.events.pool_state)."""

    TYPE: ClassVar[str] = "snapshot"
    num_blocks: int
    block_size: int
    tables: dict[str, list[int]]
    tokens: dict[str, int]
    cached: list[int]
    hashed: list[int]
    created: dict[str, float]
    preemptions: int
    prefix_query_tokens: int
    prefix_hit_tokens: int


# ---- told to a watcher about its stream, never recorded ---------------------------------------
@dataclass(frozen=True)
class Watching(BlockEvent):
    TYPE: ClassVar[str] = "watching"


@dataclass(frozen=True)
class Missed(BlockEvent):
    TYPE: ClassVar[str] = "missed"
    count: int


EVENT_TYPES: dict[str, type[BlockEvent]] = {
    cls.TYPE: cls
    for cls in (
        Allocate,
        Append,
        Free,
        Preempt,
        Evict,
        BlockStored,
        BlockRemoved,
        AllBlocksCleared,
        Restart,
        PoolRegistered,
        PoolReleased,
        Snapshot,
        Watching,
        Missed,
    )
}


def parse(event: dict) -> BlockEvent:
    """A logged event's record (KeyError for an unknown type or a missing field)."""
    cls = EVENT_TYPES[event["type"]]
    return cls(**{name: event[name] for name in field_names(cls)})
