"""The two maintained grammar engines on our tokenizer, side by side: how the choice of
llguidance was made. `python -m bench.grammar_engines` (xgrammar is not a dependency: put it on
the path to compare, e.g. `pip install --target /tmp/xgr --no-deps xgrammar apache-tvm-ffi` and
`PYTHONPATH=/tmp/xgr`; without it only llguidance is measured).

For each of the ten schemas of bench.structured_schemas (as an array of 6 of it, as
bench.structured generates them): the compile time (a fresh compiler, the tokenizer built
before the clock starts), then the mask time per token while a valid output is fed in (the output
made by llguidance's own constrained sampling over a seeded random walk: at every step the first
allowed token of a seeded permutation). Both engines see the same tokens. Printed: compile p50 /
max, mask p50 / p99 per engine, and the tokenizer build time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from bench.quick import add_quick_flag, apply_quick
from bench.structured_schemas import SCHEMAS
from common.tokenizer import get_tokenizer

VOCAB, EOS = 50257, 50256


def walk(matcher, rng: random.Random, max_tokens: int = 400) -> list[int]:
    """A valid output: each step's first allowed token of a random permutation of the vocabulary."""
    from llguidance.numpy import fill_next_token_bitmask

    order = list(range(VOCAB))
    tokens, mask = [], np.zeros((1, (VOCAB + 31) // 32), dtype=np.int32)
    while len(tokens) < max_tokens and not matcher.is_stopped():
        fill_next_token_bitmask(matcher, mask, 0)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:VOCAB]
        rng.shuffle(order)
        token = next(t for t in order if allowed[t])
        if token == EOS:
            break
        matcher.consume_token(token)
        tokens.append(token)
    return tokens


def llguidance_engine(tokenizer):
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask
    from llguidance.tiktoken import lltokenizer_from_encoding

    start = time.perf_counter()
    tok = lltokenizer_from_encoding(tokenizer.encoding, n_vocab=VOCAB, eos_token=EOS)
    build = time.perf_counter() - start

    def compile_(schema: dict):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        return llguidance.LLMatcher(tok, grammar)

    def masks(matcher, tokens: list[int]) -> list[float]:
        mask, times = np.zeros((1, (VOCAB + 31) // 32), dtype=np.int32), []
        for token in tokens:
            start = time.perf_counter()
            fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - start)
            matcher.consume_token(token)
        return times

    return build, compile_, masks


disagreements: list[tuple[str, int]] = []  # (schema, token) llguidance allowed and xgrammar refused
schema_name_of: dict[int, str] = {}


def xgrammar_engine(tokenizer):
    import xgrammar as xgr

    start = time.perf_counter()
    vocab = [tokenizer.token_bytes(i) for i in range(VOCAB)]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[EOS])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    build = time.perf_counter() - start

    def compile_(schema: dict):
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return xgr.GrammarMatcher(compiled)

    def masks(matcher, tokens: list[int]) -> list[float]:
        mask, times = xgr.allocate_token_bitmask(1, VOCAB), []
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - start)
            if not matcher.accept_token(token):  # the engines read the schema differently here
                disagreements.append((schema_name_of[id(matcher)], token))
                break
        return times

    return build, compile_, masks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=6, help="array items per output")
    add_quick_flag(ap, items=1)
    args = apply_quick(ap.parse_args(argv))
    tokenizer = get_tokenizer()
    engines = {"llguidance": llguidance_engine}
    try:
        import xgrammar  # noqa: F401

        engines["xgrammar"] = xgrammar_engine
    except ImportError:
        print("xgrammar not importable: measuring llguidance only")
    schemas = {
        n: {"type": "array", "items": s, "minItems": args.items, "maxItems": args.items} for n, s in SCHEMAS.items()
    }
    _, ll_compile, _ = llguidance_engine(tokenizer)
    outputs = {n: walk(ll_compile(s), random.Random(i)) for i, (n, s) in enumerate(schemas.items())}
    print("| engine | tokenizer build (s) | compile p50 / max (ms) | mask p50 / p99 (us) |")
    print("|---|---|---|---|")
    for name, make in engines.items():
        build, compile_, masks = make(tokenizer)
        compiles, mask_times = [], []
        for schema_name, schema in schemas.items():
            start = time.perf_counter()
            matcher = compile_(schema)
            compiles.append((time.perf_counter() - start) * 1000)
            schema_name_of[id(matcher)] = schema_name
            mask_times += masks(matcher, outputs[schema_name])
        mask_times.sort()
        p99 = mask_times[int(0.99 * (len(mask_times) - 1))] * 1e6
        print(
            f"| {name} | {build:.2f} | {statistics.median(compiles):.2f} / {max(compiles):.2f} "
            f"| {statistics.median(mask_times) * 1e6:.0f} / {p99:.0f} |"
        )
    print(f"tokens fed: {sum(len(t) for t in outputs.values())} over {len(outputs)} schemas")
    if "xgrammar" in engines:
        refused = [(name, get_tokenizer().decode([t])) for name, t in disagreements]
        print(f"schemas where xgrammar refused a token of llguidance's output (fed no further): {refused}")


if __name__ == "__main__":
    main()
