"""The one check the KV writes of a step's decode rows pass before layer 0 writes (the PyTorch layer loop;
csrc/decode_step.cpp checks the same for the fused step): every used block id lies in the pool,
and each sequence writes only the next slot of its own table, in a block no other sequence of
the step holds. The layer loop's indexed write takes any slot it is given (and wraps a negative
one): a wrong one would overwrite another sequence's KV without a word."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from compute_service.model import AttentionMetadata


def check_decode_writes(meta: AttentionMetadata, num_blocks: int, block_size: int) -> None:
    """Refuse (RuntimeError) a decode step whose tables name blocks outside the pool or whose
    new k/v would land anywhere but the next slot of the sequence's own table, in a block no other
    sequence of the step holds. The layer loop's indexed write takes any slot it is given (and
    wraps a negative one): a wrong one would overwrite another sequence's KV without a word.
    csrc/decode_step.cpp checks the same for the fused step. Once per step, before layer 0
    writes: O(B x max_blocks) vectorized work and one read of the verdict."""
    tables, lens, slots = meta.block_tables, meta.context_lens, meta.slot_mapping[: meta.num_decodes]
    if tables is None or lens is None or tables.dim() != 2 or not lens.shape == slots.shape == (tables.shape[0],):
        raise RuntimeError("decode metadata: block_tables (B, max_blocks), context_lens (B,) and slot_mapping (B,)")
    batch, max_blocks = tables.shape
    capacity = max_blocks * block_size
    if batch == 0:
        return
    if capacity == 0:
        raise RuntimeError("decode metadata: block_tables holds no blocks")
    used = torch.arange(max_blocks, device=tables.device)[None, :] * block_size < lens[:, None]  # (B, max_blocks)
    last = (lens.long() - 1).clamp(0, capacity - 1)  # the new token's position (clamped: checked below)
    write_block = tables.gather(1, (last // block_size)[:, None])[:, 0].long()
    lens_ok = ((lens >= 1) & (lens <= capacity)).all()
    in_pool = (tables >= 0) & (tables < num_blocks)
    blocks_ok = (in_pool | ~used).all()
    slots_ok = (slots == write_block * block_size + last % block_size).all()
    # How many used entries of the whole step hold each block (the rest counted in a spare bin): a
    # write block held once, by its writer as its last block, is no other sequence's and no other writer's.
    held = torch.bincount(tables.long().masked_fill(~(used & in_pool), num_blocks).view(-1), minlength=num_blocks + 1)
    alone = (held[write_block.clamp(0, num_blocks)] == 1).all()
    if bool(lens_ok & blocks_ok & slots_ok & alone):
        return
    if not lens_ok:
        b = int((~((lens >= 1) & (lens <= capacity))).nonzero()[0])
        raise RuntimeError(f"context_lens[{b}] = {int(lens[b])} outside 1..{capacity} (its block table's capacity)")
    if not blocks_ok:
        b, i = (int(x) for x in (used & ~in_pool).nonzero()[0])
        raise RuntimeError(f"block_tables[{b}][{i}] holds block {int(tables[b, i])} outside the pool of {num_blocks}")
    if not slots_ok:
        b = int((slots != write_block * block_size + last % block_size).nonzero()[0])
        raise RuntimeError(f"slot_mapping[{b}] = {int(slots[b])} is not the next slot of its sequence's own table")
    raise RuntimeError("slot_mapping writes into a block another sequence of the step holds (or twice in one table)")
