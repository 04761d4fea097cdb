"""KVCache: the one preallocated tensor pool every sequence's keys and values live in.

Layout `[n_layer, 2, num_blocks, n_head, block_size, head_dim]`: one block of one head is a
contiguous `block_size x head_dim` tile, so the decode kernel streams each (sequence, head)
context block by block without gathering it first (see bench/attention.py for the measurement).
Which blocks belong to whom is decided elsewhere (memory_service.block_allocator); this class
only moves tensors.
"""

from __future__ import annotations

import torch

from compute_service.hugepages import hugepage_zeros


class KVCache:
    def __init__(
        self,
        n_layer: int,
        n_head: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (n_layer, 2, num_blocks, n_head, block_size, head_dim)
        if torch.device(device).type == "cpu":  # decode streams it: huge pages save the page walks
            self.pool = hugepage_zeros(shape, dtype)
            # Fault every page in now: the mapping is lazy, and a step that first touches a block
            # paid ~1.3 ms per MB of it (a 900-token prompt's blocks: ~90 ms on the build machine),
            # so latency depended on which blocks a request happened to get; and a pool this
            # machine cannot hold fails here, at start, not in the middle of serving.
            self.pool.zero_()
        else:
            self.pool = torch.zeros(shape, device=device, dtype=dtype)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each (num_blocks, nh, block_size, hs)."""
        return self.pool[layer, 0], self.pool[layer, 1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v (N, nh, hs) of N new tokens at their slots: one indexed write each."""
        blocks = torch.div(slot_mapping, self.block_size, rounding_mode="floor")
        offsets = slot_mapping - blocks * self.block_size
        k_cache, v_cache = self.layer(layer)
        k_cache[blocks, :, offsets] = k  # advanced indices around a slice -> (N, nh, hs)
        v_cache[blocks, :, offsets] = v
