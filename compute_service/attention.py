"""Decode attention over the paged KV cache: a C++ kernel that reads blocks in place, with a
pure-PyTorch fallback (gather into a reused buffer, then SDPA) for other devices and dtypes.

The backend is a setting (EngineConfig.attention_backend = auto | cpp | torch), held by each
attention layer (GPT.set_backends). The kernel is one of the CPU kernels compute_service.native
builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compute_service.native import load_extension

ATTENTION_BACKENDS = ("auto", "cpp", "torch")


def cpp_attention_enabled(backend: str) -> bool:
    """Whether CPU float32 decode attention runs the C++ kernel with this backend setting."""
    return backend != "torch" and load_extension() is not None


def paged_decode_attention(
    q: torch.Tensor,  # (B, nh, hs)
    k_cache: torch.Tensor,  # (num_blocks, nh, block_size, hs)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
    backend: str = "auto",  # auto | cpp (fail if it cannot run) | torch
) -> torch.Tensor:  # (B, nh, hs)
    use_cpp = q.device.type == "cpu" and q.dtype == torch.float32 and backend != "torch"
    if use_cpp and (ext := load_extension()) is not None:
        return ext.paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    if backend == "cpp":
        raise RuntimeError("attention_backend=cpp but the C++ kernel cannot run here")
    return torch_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def torch_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference path: index_select every sequence's blocks, then masked SDPA."""
    batch, max_blocks = block_tables.shape
    _, n_head, block_size, head_dim = k_cache.shape
    flat = block_tables.reshape(-1).long()
    # (B, max_blocks, nh, bs, hs) -> (B, nh, max_blocks * bs, hs)
    keys = k_cache.index_select(0, flat).view(batch, max_blocks, n_head, block_size, head_dim)
    values = v_cache.index_select(0, flat).view(batch, max_blocks, n_head, block_size, head_dim)
    keys = keys.transpose(1, 2).reshape(batch, n_head, max_blocks * block_size, head_dim)
    values = values.transpose(1, 2).reshape(batch, n_head, max_blocks * block_size, head_dim)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = positions[None, :] < context_lens[:, None].to(q.device)  # (B, T) True = attend
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale
    )  # (B, nh, 1, hs)
    return out.squeeze(2)
