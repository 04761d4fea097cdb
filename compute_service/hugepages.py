"""Weights and the KV pool in transparent huge pages (2 MiB) where the OS offers them.

Decode streams ~0.5 GB of weights a token; with 4 KiB pages that is 120,000 TLB entries a step
and the page walks show: the linear layers read 10.8 ms a token from ordinary memory and 8.8 ms
from huge pages on the build machine (docs/benchmarks.md, "Decode speed"). Most Linux machines set
transparent huge pages to `madvise`, so memory gets them only when asked: we allocate one
anonymous mapping, madvise(MADV_HUGEPAGE) it and place tensors inside (llama.cpp gets the same
effect from mmap-ing its model file). Elsewhere (no MADV_HUGEPAGE) tensors stay where they are.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn as nn

HUGE_PAGE = 2 << 20
_ALIGN = 64  # every tensor starts on a cache line


def available() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE")


def hugepage_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of `nbytes` starting on a huge-page boundary, in a mapping advised
    to use huge pages. The tensor keeps the mapping alive (torch.frombuffer holds it)."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP, or a filter refusing madvise: ordinary pages then
        pass
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE_PAGE
    return whole[start : start + nbytes]


def hugepage_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype) in huge pages (or plain, where unavailable)."""
    if not available():
        return torch.zeros(shape, dtype=dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return hugepage_bytes(math.prod(shape) * itemsize).view(dtype).view(shape)


def move_to_hugepages(model: nn.Module) -> None:
    """Copy every CPU parameter, buffer and decode weight copy (compute_service.linear) of
    `model` into one huge-page arena, in place (tied parameters stay tied)."""
    if not available():
        return
    slots: list[tuple[object, str, torch.Tensor]] = []  # (owner, attribute, tensor)
    seen: set[int] = set()
    for module in model.modules():
        named = [
            *module._parameters.items(),
            *module._buffers.items(),
            *((n, getattr(module, n, None)) for n in ("decode_weight", "decode_scale")),
        ]
        for name, tensor in named:
            if tensor is None or tensor.device.type != "cpu" or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            slots.append((module, name, tensor))
    sizes = [(t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN for _, _, t in slots]
    arena = hugepage_bytes(sum(sizes))
    offset = 0
    for (module, name, tensor), size in zip(slots, sizes, strict=False):
        nbytes = tensor.numel() * tensor.element_size()
        moved = arena[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        moved.copy_(tensor.detach())
        if isinstance(tensor, nn.Parameter):
            tensor.data = moved  # the Parameter object (and every tie to it) stays
        else:
            setattr(module, name, moved)
        offset += size
