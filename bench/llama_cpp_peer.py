"""llama.cpp as a benchmark peer on the SAME weights as our engine.

Our GPT (nanoGPT names) is written to a GGUF file that llama.cpp's `gpt2` architecture loads, laid
out as llama.cpp's convert_hf_to_gguf.py lays out GPT-2 (so the peer runs llama.cpp's own,
unmodified GPT-2 path), then driven through llama-cpp-python's low-level API: the high-level
`Llama` class adds Python-side sampling/bookkeeping that would bias the numbers, and it cannot put
several sequences in one `llama_batch`, which is how llama.cpp's server batches.
llama-cpp-python, gguf and transformers are benchmark extras: never imported by the services.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp._logger import set_verbose

from common.tokenizer import EOT_TOKEN, EOT_TOKEN_ID, RANKS_FILE, _load_ranks

set_verbose(False)  # llama.cpp logs through llama-cpp-python's callback; keep only errors
GGUF_FORMAT_VERSION = 1  # bump when write_gguf's output changes, so cached files are rebuilt
_Q, _F = gguf.GGMLQuantizationType, gguf.LlamaFileType
_FTYPES = {"f32": (_F.ALL_F32, _Q.F32), "f16": (_F.MOSTLY_F16, _Q.F16), "q8_0": (_F.MOSTLY_Q8_0, _Q.Q8_0)}
_LAYER_TENSORS = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the strings llama.cpp's BPE vocab expects for tokens/merges."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """tiktoken ships ranks, not merges: token r was made by the merge that BPE (using only ranks
    below r) leaves as the last two parts of its bytes. In rank order, i.e. merges.txt order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                raise ValueError(f"cannot recover the merge of token {token!r}")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _add_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    ranks = _load_ranks(RANKS_FILE)
    u = _bytes_to_unicode()
    text = lambda b: "".join(u[x] for x in b)  # noqa: E731
    tokens = [""] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for tok, i in ranks.items():
        tokens[i] = text(tok)
    tokens[EOT_TOKEN_ID], types[EOT_TOKEN_ID] = EOT_TOKEN, gguf.TokenType.CONTROL
    for i in range(len(ranks) + 1, vocab_size):  # a padded vocab (none for GPT-2's 50257)
        tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, GPT-2's pre-tokenizer regex
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{text(a)} {text(b)}" for a, b in _recover_merges(ranks)])
    writer.add_bos_token_id(EOT_TOKEN_ID)
    writer.add_eos_token_id(EOT_TOKEN_ID)


def write_gguf(model, path: str | os.PathLike, ftype: str = "f32") -> Path:
    """Write `model` (compute_service.model.GPT) as a llama.cpp `gpt2` GGUF at `path`.

    As convert_hf_to_gguf.py does for GPT-2: nn.Linear (out, in) arrays go as-is (GGUF reverses
    shapes), the tied lm_head is written again as `output`, and only 2-D matrices other than the
    position embedding are f16/q8_0 (norms, biases and wpe stay f32)."""
    file_type, qtype = _FTYPES[ftype]
    cfg, sd = model.config, {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "gpt2")
    for add_kv, value in (
        (writer.add_name, "nanogpt"),
        (writer.add_context_length, cfg.context_length),
        (writer.add_embedding_length, cfg.n_embd),
        (writer.add_feed_forward_length, 4 * cfg.n_embd),
        (writer.add_block_count, cfg.n_layer),
        (writer.add_head_count, cfg.n_head),
        (writer.add_layer_norm_eps, cfg.layer_norm_epsilon),
        (writer.add_file_type, file_type),
    ):
        add_kv(value)
    _add_tokenizer(writer, cfg.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def add(name: str, arr: np.ndarray) -> None:
        if arr.ndim != 2 or name == "position_embd.weight" or qtype == _Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:  # f16: a plain cast, as the converter; q8_0: gguf's numpy port of ggml's quantizer
            writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", sd["transformer.wte.weight"])
    add("position_embd.weight", sd["transformer.wpe.weight"])
    for i in range(cfg.n_layer):
        for (ours, theirs), kind in itertools.product(_LAYER_TENSORS.items(), ("weight", "bias")):
            add(f"blk.{i}.{theirs}.{kind}", sd[f"transformer.h.{i}.{ours}.{kind}"])
    for kind in ("weight", "bias"):
        add(f"output_norm.{kind}", sd[f"transformer.ln_f.{kind}"])
    add("output.weight", sd["transformer.wte.weight"])  # lm_head is tied to wte
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def cached_gguf(spec: str, ftype: str, cache_dir: str | os.PathLike) -> Path:
    """The GGUF of model `spec` in `ftype`, written once into `cache_dir` and reused. Keyed by
    spec + ftype + GGUF_FORMAT_VERSION only: a directory spec whose files change needs its cached
    file removed. Reuse also matters for the numbers: on the 2-core VM, f32 decode on a GGUF
    written in the last minute or two ran 72-86 tok/s, on an older one 103-114 (fsync or writing
    from another process did not help), so time a file that was not just written."""
    from compute_service.weights import load_model

    key = hashlib.sha1(f"{spec}|{ftype}|{GGUF_FORMAT_VERSION}".encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)[-40:]
    path = Path(cache_dir) / f"{safe}-{ftype}-{key}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        write_gguf(load_model(spec), tmp, ftype)
        os.replace(tmp, path)  # atomic: a crashed write never leaves a half file under the key
    return path


class LlamaCppPeer:
    """One llama.cpp model + context. `n_ctx` is the whole KV cache, as llama.cpp's `-c`: with
    kv_unified=False (one KV stream per sequence) each sequence gets n_ctx // n_seq_max cells and
    attends only over its own stream. flash_attn=None keeps llama.cpp's default (auto)."""

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        n_threads: int = 2,
        n_ctx: int = 1024,
        n_seq_max: int = 1,
        n_batch: int = 512,
        kv_unified: bool = False,
        flash_attn: bool | None = None,
    ) -> None:
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_seq_max = n_ctx, n_seq_max
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.kv_unified, cparams.no_perf = kv_unified, True
        if flash_attn is not None:
            cparams.flash_attn_type = int(flash_attn)
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.n_batch, self.n_seq_max = n_batch, n_seq_max
        self._batch = llama_cpp.llama_batch_init(max(n_batch, n_seq_max), 0, 1)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None

    def __enter__(self) -> "LlamaCppPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode(self, tokens: list[int], pos: list[int], seqs: list[int], want: list[bool]) -> None:
        b = self._batch
        b.n_tokens = len(tokens)
        for i, (t, p, s, w) in enumerate(zip(tokens, pos, seqs, want, strict=False)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = t, p, 1, s, w
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(tokens)} tokens")
        llama_cpp.llama_synchronize(self._ctx)

    def _logits_row(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))

    def _prefill(self, ids: list[int], seq: int = 0) -> int:
        """Prompt into `seq` in n_batch chunks; the greedy next token."""
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self._decode(
                chunk,
                list(range(start, start + len(chunk))),
                [seq] * len(chunk),
                [last and i == len(chunk) - 1 for i in range(len(chunk))],
            )
        return int(np.argmax(self._logits_row(-1)))

    def clear(self) -> None:
        """Drop every sequence's KV cells (llama_memory_clear; 0.3.36 has no llama_kv_self_*)."""
        llama_cpp.llama_memory_clear(self._mem, True)

    def _timed_prefill(self, ids: list[int]) -> tuple[float, int]:
        self.clear()
        t0 = time.perf_counter()
        tok = self._prefill(ids)
        return time.perf_counter() - t0, tok

    def logits(self, prompt_ids: list[int]) -> np.ndarray:
        """Last-position logits (vocab,) of a fresh sequence."""
        self.clear()
        self._prefill(prompt_ids)
        return self._logits_row(-1).copy()

    def decode_single(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
        """Greedy single stream, one token per llama_decode: (prefill seconds, decode tok/s)."""
        prefill_s, tok = self._timed_prefill(prompt_ids)
        t1 = time.perf_counter()
        for p in range(len(prompt_ids), len(prompt_ids) + new_tokens):
            self._decode([tok], [p], [0], [True])
            tok = int(np.argmax(self._logits_row(0)))
        return prefill_s, new_tokens / (time.perf_counter() - t1)

    def decode_batched(self, batch: int, prompt_ids_per_seq: list[list[int]], steps: int) -> float:
        """Decode tok/s with all `batch` sequences in ONE llama_batch per llama_decode (own seq_id,
        logits for each one's token, greedy argmax per row), as llama.cpp's server batches. Prefill
        (one sequence at a time) and one warm-up step are not timed."""
        if len(prompt_ids_per_seq) != batch or batch > self.n_seq_max:
            raise ValueError(f"batch {batch}: {len(prompt_ids_per_seq)} prompts, n_seq_max {self.n_seq_max}")
        self.clear()
        toks = [self._prefill(ids, s) for s, ids in enumerate(prompt_ids_per_seq)]
        pos = [len(ids) for ids in prompt_ids_per_seq]
        seqs, want = list(range(batch)), [True] * batch
        for step in range(steps + 1):
            if step == 1:
                t0 = time.perf_counter()
            self._decode(toks, pos, seqs, want)
            toks = [int(np.argmax(self._logits_row(i))) for i in range(batch)]
            pos = [p + 1 for p in pos]
        return batch * steps / (time.perf_counter() - t0)

    def prefill_tok_per_s(self, prompt_ids: list[int], repeats: int = 3) -> float:
        """Best of `repeats` cold prefills (KV cleared each time) after one warm-up."""
        self._timed_prefill(prompt_ids)
        return len(prompt_ids) / min(self._timed_prefill(prompt_ids)[0] for _ in range(repeats))


# max |logit diff| vs HF seen (random prompts of 8-256 tokens + one text prompt): dummy:gpt2 (logit
# std 0.56) f32 1.9e-3, f16 2.5e-3, q8_0 5.7e-2; shakespeare (trained, std 2-4) f32 1.4e-3, f16
# 5.7e-3, q8_0 0.23. Bounds ~5x, ~9x and ~2x over the worst of those.
TOLERANCES = {"f32": 1e-2, "f16": 5e-2, "q8_0": 0.5}


def check_logits(peer: LlamaCppPeer, model, prompt_ids: list[int], ftype: str) -> float:
    """llama.cpp's last-position logits vs transformers' GPT2LMHeadModel on our weights (the
    project's oracle, as bench/hf_peers.py builds it): a peer that runs a different model is not
    a peer. max |diff| must stay under TOLERANCES[ftype] (f32 differs only by summation order;
    f16/q8_0 round the weights and q8_0 matmuls also quantize activations), and argmax must agree
    unless HF's top-2 gap is under 2 * max|diff|: such a near-tie (dummy:gpt2 q8_0 meets gaps of
    0.03 against diffs of 0.057) is not decided at that precision. Returns the max abs diff."""
    import torch
    import transformers

    from compute_service.weights import nanogpt_to_hf_state_dict

    cfg = model.config
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            n_positions=cfg.context_length,
            vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
        )
    ).eval()
    missing, unexpected = hf.load_state_dict(nanogpt_to_hf_state_dict(model), strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing)
    with torch.inference_mode():
        want = hf(torch.tensor([prompt_ids])).logits[0, -1].float().numpy()
    got = peer.logits(prompt_ids)
    diff, top2 = float(np.max(np.abs(got - want))), np.sort(want)[-2:]
    gap, a_got, a_want = float(top2[1] - top2[0]), int(np.argmax(got)), int(np.argmax(want))
    if not diff < TOLERANCES[ftype] or (a_got != a_want and gap >= 2 * diff):
        raise RuntimeError(
            f"llama.cpp {ftype} logits disagree with HF: max|diff| {diff:.4g} (tol "
            f"{TOLERANCES[ftype]}), argmax {a_got} vs {a_want} (HF top-2 gap {gap:.4g})"
        )
    return diff
