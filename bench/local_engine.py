"""The engine with its block tables in this process: an InferenceEngine handed a LocalMemory over
its own BlockAllocator, for benchmarks and tests (the compute service always talks to the memory
service). `engine.allocator` is there to be read: block counts, the prefix cache, events."""

from __future__ import annotations

from compute_service.config import EngineConfig
from compute_service.engine import InferenceEngine
from memory_service.block_allocator import BlockAllocator
from memory_service.step import LocalMemory


class LocalEngine(InferenceEngine):
    def __init__(self, config: EngineConfig | None = None, **overrides) -> None:
        self.allocator: BlockAllocator | None = None
        super().__init__(config, connect_memory=self._connect, **overrides)

    def _connect(self, num_blocks: int, block_size: int) -> LocalMemory:
        self.allocator = BlockAllocator(num_blocks, block_size)
        return LocalMemory(self.allocator)

    def reset_prefix_cache(self) -> None:
        """Start cold here and in the allocator."""
        super().reset_prefix_cache()
        if self.allocator is not None:
            self.allocator.reset_prefix_cache()
