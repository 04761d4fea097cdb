"""The hardware roofline of decode: bytes a step must read / the machine's read bandwidth.

A decode step reads every weight matrix once (whatever the batch: rows of x share each weight
row) and each sequence's keys and values; at small batch it does little else, so
`tok/s <= batch * bandwidth / bytes_per_step`. The bandwidth is measured in the same run by
streaming a buffer of at least 1 GiB with the engine's threads (bench/csrc/read_probe.cpp), best of
several tries: a probe slower than some program's implied bandwidth would be measuring itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from compute_service.hugepages import hugepage_zeros
from compute_service.linear import SKINNY_MAX_ROWS, Linear, skinny_kernel
from compute_service.model import GPT
from compute_service.native import compile_module, compiler_available

PROBE_SOURCE = Path(__file__).parent / "csrc" / "read_probe.cpp"


def probe_extension():
    """The bandwidth probe's own extension module (built once, cached by torch), or None without
    a C++ compiler (then torch's sum reads the buffer: slower than the memory on some CPUs)."""
    return compile_module("paged_nanogpt_read_probe", [str(PROBE_SOURCE)]) if compiler_available() else None


class ReadProbe:
    """A float32 buffer of `gib` GiB in huge pages (as the engine's weights) and the kernel that
    streams it. Held by a benchmark that probes between its timed runs: on a VM whose bandwidth
    moves by 2x from minute to minute, only a probe taken next to a run says what that run had."""

    def __init__(self, gib: float = 1.0) -> None:
        numel = int(gib * 2**30) // 4 // 4096 * 4096
        self.buffer = hugepage_zeros((numel,), torch.float32).fill_(1.0)
        ext = probe_extension()
        self.read = ext.stream_read_sum if ext is not None else (lambda b: float(b.sum()))
        self.read(self.buffer)  # one untimed pass

    def best_gb_per_s(self, tries: int = 7) -> float:
        """Best read bandwidth (GB/s, 1e9 bytes) over `tries` passes."""
        best = 0.0
        for _ in range(tries):
            start = time.perf_counter()
            self.read(self.buffer)
            best = max(best, self.buffer.numel() * 4 / (time.perf_counter() - start) / 1e9)
        return best


def read_bandwidth_gb_per_s(gib: float = 1.0, tries: int = 7) -> float:
    """Best read bandwidth (GB/s, 1e9 bytes) over `tries` passes of a fresh `gib` GiB buffer."""
    return ReadProbe(gib).best_gb_per_s(tries)


def weight_bytes_per_step(model: GPT, batch: int = 1) -> int:
    """Bytes of every linear layer's weights as a decode step of `batch` rows reads them (the
    bfloat16/int8 copy only where the skinny kernel runs: <= SKINNY_MAX_ROWS rows), biases
    included, lm_head (tied to the embedding) counted once as a matrix."""
    low_precision_read = batch <= SKINNY_MAX_ROWS and skinny_kernel() is not None
    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            use_copy = module.decode_weight is not None and low_precision_read
            weight = module.decode_weight if use_copy else module.weight
            total += weight.numel() * weight.element_size()
            if use_copy and module.decode_scale is not None:
                total += module.decode_scale.numel() * 4
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
    return total


def kv_bytes_per_step(model: GPT, context_lens: list[int], element_size: int = 4) -> int:
    """Keys and values every sequence's attention reads, all layers."""
    cfg = model.config
    return 2 * cfg.n_layer * cfg.n_embd * element_size * sum(context_lens)


def roofline_tokens_per_second(model: GPT, batch: int, context: int, bandwidth_gb_per_s: float) -> float:
    step_bytes = weight_bytes_per_step(model, batch) + kv_bytes_per_step(model, [context] * batch)
    return batch * bandwidth_gb_per_s * 1e9 / step_bytes
