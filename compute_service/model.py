"""NanoGPT (the GPT-2 architecture, as nanoGPT's model.py writes it) reading a paged KV cache.

A step runs a *batch* of rows packed into one token dimension N (no padding):
- decode rows first: one new token per sequence, attending to its cached context through its
  block table (the paged decode kernel);
- then prompt chunks (variable lengths, `seq_lens`): causal over their own tokens and over what
  the pool holds of their sequence already (a cached prefix, earlier chunks of a long prompt).
A step of decode rows only may run as one C++ call (csrc/decode_step.cpp, the fused decode).
The KV cache is optional: without one the model is plain nanoGPT (the `no-cache` mode).
Weights use nanoGPT's parameter names; `compute_service.weights` maps Hugging Face names to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from compute_service.attention import cpp_attention_enabled, paged_decode_attention
from compute_service.kv_cache import KVCache
from compute_service.kv_write_check import check_decode_writes
from compute_service.linear import NO_TENSOR, SKINNY_MAX_ROWS, Linear, skinny_kernel


@dataclass
class GPTConfig:
    context_length: int = 1024  # maximum sequence length (positions); nanoGPT calls it block_size
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class AttentionMetadata:
    """How the packed tokens of one step map onto sequences and KV-cache slots. Rows of one
    token come first (`num_decodes` of them: decodes, attending to their context through the
    paged decode kernel); the rest are prompt chunks (causal over themselves, and over the tokens
    their sequence has in the pool already). A step may hold either kind or both."""

    seq_lens: list[int]  # tokens of each row in this step (1 for the decode rows)
    num_decodes: int = 0  # leading rows that attend through block_tables / context_lens
    slot_mapping: torch.Tensor | None = None  # (N,) int64: block_id * block_size + offset
    block_tables: torch.Tensor | None = None  # (num_decodes, max_blocks) int32
    context_lens: torch.Tensor | None = None  # (num_decodes,) int32 tokens to attend to, the new one included
    # Chunks after tokens already in the pool (a cached prefix, or earlier chunks): per chunk row,
    # how many (None: none anywhere in the batch), and the block tables (int64) of those with some.
    prefix_lens: list[int] | None = None
    prefix_tables: list[torch.Tensor | None] | None = None

    @property
    def is_decode(self) -> bool:
        """Every row is a decode row."""
        return self.num_decodes == len(self.seq_lens)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.backend = "auto"  # decode attention: EngineConfig.attention_backend (GPT.set_backends)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        n_tokens, n_embd = x.shape  # (N, C)
        q, k, v = self.c_attn(x).split(n_embd, dim=1)
        q = q.view(n_tokens, self.n_head, self.head_dim)  # (N, nh, hs)
        k = k.view(n_tokens, self.n_head, self.head_dim)
        v = v.view(n_tokens, self.n_head, self.head_dim)
        if kv_cache is not None and meta.slot_mapping is not None:
            kv_cache.write(layer, k, v, meta.slot_mapping)

        decodes = meta.num_decodes
        outputs = []  # (num_decodes, nh, hs), then (N - num_decodes, nh, hs)
        if decodes:
            assert kv_cache is not None, "decode needs a KV cache"
            k_cache, v_cache = kv_cache.layer(layer)
            scale = 1.0 / math.sqrt(self.head_dim)
            outputs.append(
                paged_decode_attention(
                    q[:decodes], k_cache, v_cache, meta.block_tables, meta.context_lens, scale, self.backend
                )
            )
        if decodes < len(meta.seq_lens):
            qc, kc, vc, chunk_lens = q[decodes:], k[decodes:], v[decodes:], meta.seq_lens[decodes:]
            if meta.prefix_lens is not None:
                outputs.append(self._prefill_after_prefix(qc, kc, vc, chunk_lens, meta, kv_cache.layer(layer)))
            else:
                outputs.append(self._prefill_attention(qc, kc, vc, chunk_lens))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (N, nh, hs)
        return self.c_proj(y.reshape(n_tokens, n_embd))

    @staticmethod
    def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Causal attention of each sequence over its own tokens (packed, one SDPA per sequence)."""
        if len(seq_lens) == 1:
            qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, nh, T, hs)
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
        outputs = []
        for qi, ki, vi in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=False):
            qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (qi, ki, vi))  # (1, nh, T, hs)
            outputs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
        return torch.cat(outputs, dim=0)  # (N, nh, hs)

    @classmethod
    def _prefill_after_prefix(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk_lens: list[int],
        meta: AttentionMetadata,
        kv_layer: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Prompt chunks of which some start past tokens already in the pool (a cached prefix of
        whole blocks, or the sequence's earlier chunks, ending anywhere in a block): a chunk's T
        new tokens attend to those P tokens, read through the block table, and causally to
        themselves. Chunks with the same prefix (one system prompt) share one gather of it."""
        k_cache, v_cache = kv_layer  # (num_blocks, nh, bs, hs)
        block_size = k_cache.shape[2]
        prefixes: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        outputs = []
        qs, ks, vs = q.split(chunk_lens), k.split(chunk_lens), v.split(chunk_lens)
        splits = zip(qs, ks, vs, meta.prefix_lens, meta.prefix_tables, strict=True)
        for qi, ki, vi, prefix, table in splits:
            if prefix == 0:
                outputs.append(cls._prefill_attention(qi, ki, vi, [qi.shape[0]]))
                continue
            blocks = table[: -(-prefix // block_size)]
            key = (prefix, *blocks.tolist())
            if key not in prefixes:  # (nb, nh, bs, hs) -> (nh, P, hs)
                prefixes[key] = tuple(
                    c.index_select(0, blocks).transpose(0, 1).flatten(1, 2)[:, :prefix] for c in (k_cache, v_cache)
                )
            k_prefix, v_prefix = prefixes[key]
            keys = torch.cat([k_prefix, ki.transpose(0, 1)], dim=1)[None]  # (1, nh, P + T, hs)
            values = torch.cat([v_prefix, vi.transpose(0, 1)], dim=1)[None]
            new = qi.shape[0]
            allowed = (
                torch.arange(prefix + new, device=q.device)[None, :]
                <= prefix + torch.arange(new, device=q.device)[:, None]
            )
            out = F.scaled_dot_product_attention(
                qi.transpose(0, 1)[None], keys, values, attn_mask=allowed
            )  # (1, nh, T, hs)
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs, dim=0)  # (N, nh, hs)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face).
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))

    def decode_params(self) -> list[torch.Tensor]:
        """This layer's 16 tensors in the order csrc/decode_step.cpp reads them."""
        return [
            *norm_args(self.ln_1),
            *self.attn.c_attn.decode_args(),
            *self.attn.c_proj.decode_args(),
            *norm_args(self.ln_2),
            *self.mlp.c_fc.decode_args(),
            *self.mlp.c_proj.decode_args(),
        ]


def norm_args(ln: nn.LayerNorm) -> list[torch.Tensor]:
    """(weight, bias) of a layer norm as the C++ decode step reads them (empty: no bias)."""
    return [ln.weight, NO_TENSOR if ln.bias is None else ln.bias]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.context_length, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self._decode_params: list[torch.Tensor] | None = None  # for the fused decode, made at first use
        self.fused_decode, self.attention_backend, self.linear_backend = True, "auto", "auto"

    def set_backends(self, attention: str = "auto", linear: str = "auto", fused_decode: bool = True) -> None:
        """Which kernels decode runs (EngineConfig.attention_backend, linear_backend,
        fused_decode): switches for measuring and debugging the kernels against the PyTorch
        paths. fused_decode=False runs decode steps through the Python layer loop (the same
        function to ~1e-6, slower): what the fusion buys."""
        self.fused_decode, self.attention_backend, self.linear_backend = fused_decode, attention, linear
        for module in self.modules():
            if isinstance(module, Linear):
                module.backend = linear
            elif isinstance(module, CausalSelfAttention):
                module.backend = attention

    def set_weight_format(self, weight_format: str) -> None:
        """float32 | bfloat16 | int8: the copy of the weights decode reads (compute_service.linear)."""
        self._decode_params = None  # the fused decode's list of tensors is made again
        for module in self.modules():
            if isinstance(module, Linear):
                module.set_weight_format(weight_format)

    def init_weights(self, seed: int) -> None:
        """nanoGPT's initialisation, seeded: the `dummy:*` models used by tests and benchmarks."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
                torch.nn.init.normal_(p, 0.0, std, generator=gen)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)
            elif "ln_" in name:
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.normal_(p, 0.0, 0.02, generator=gen)

    def forward(
        self,
        input_ids: torch.Tensor,  # (N,) packed token ids of every sequence in the step
        positions: torch.Tensor,  # (N,) position of each token in its sequence
        meta: AttentionMetadata,
        kv_cache: KVCache | None = None,
        logits_indices: torch.Tensor | None = None,  # (B,) rows whose logits are needed (None: all)
        fused_decode: bool = True,
    ) -> torch.Tensor:
        """Logits of the step's rows (logits_indices; None: every row). A decode step asking for
        every row runs in one C++ call where it can (_fused_decode_runs); the rest in Python."""
        if fused_decode and logits_indices is None and self._fused_decode_runs(input_ids, meta, kv_cache):
            return self._fused_decode(input_ids, positions, meta, kv_cache)  # (B, vocab): all below in one C++ call
        return self.lm_head(self.features(input_ids, positions, meta, kv_cache, logits_indices))  # (B, vocab)

    def features(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states (after ln_f) that lm_head turns into logits; training takes
        them to compute the softmax in chunks."""
        if kv_cache is not None and meta.num_decodes and meta.slot_mapping is not None:
            check_decode_writes(meta, kv_cache.num_blocks, kv_cache.block_size)  # before layer 0 writes
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (N, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, meta, kv_cache, layer)
        if logits_indices is not None:
            x = x.index_select(0, logits_indices)  # (B, C): lm_head on the last positions only
        return self.transformer.ln_f(x)  # (B, C)

    def _fused_decode_runs(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache | None) -> bool:
        """A decode step on the CPU in float32, a batch the few-row kernel takes, the C++ attention
        kernel chosen, no autograd: where csrc/decode_step.cpp computes the same function."""
        wte = self.transformer.wte.weight
        return (
            meta.is_decode
            and kv_cache is not None
            and not torch.is_grad_enabled()
            and wte.device.type == "cpu"
            and wte.dtype == torch.float32
            and kv_cache.pool.dtype == torch.float32
            and input_ids.shape[0] <= SKINNY_MAX_ROWS
            and self.config.n_embd % 16 == 0
            and self.fused_decode
            and self.linear_backend == "auto"
            and skinny_kernel() is not None
            and cpp_attention_enabled(self.attention_backend)
        )

    def _fused_decode(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        """A decode step's logits in one parallel region (docs/benchmarks.md, "Decode speed", step 9). The
        tensor list is made at first use, after set_weight_format (which resets it) and the move to
        huge pages; it holds the Parameter objects, so parameters moved later keep working."""
        if self._decode_params is None:
            self._decode_params = [
                *(t for block in self.transformer.h for t in block.decode_params()),
                *norm_args(self.transformer.ln_f),
                *self.lm_head.decode_args(),
            ]
        cfg = self.config
        return skinny_kernel().decode_step(
            input_ids,
            positions,
            self.transformer.wte.weight,
            self.transformer.wpe.weight,
            self._decode_params,
            kv_cache.pool,
            meta.slot_mapping,
            meta.block_tables,
            meta.context_lens,
            cfg.n_head,
            cfg.layer_norm_epsilon,
            1.0 / math.sqrt(cfg.head_dim),
        )
