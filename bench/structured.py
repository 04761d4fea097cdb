"""What structured outputs cost a decode, side by side in one run (in-process engine, nothing else
running): `python -m bench.structured --model dummy:gpt2`.

Each of the ten schemas of bench.structured_schemas, wrapped as an array of `--items` of it (so
every output is long: >= 64 tokens), is generated with a JSON-schema constraint and, right after,
the same number of tokens without one (ignore_eos, the same prompt and seed): at batch 1 (one
request at a time) and at batch 8 (eight at once). TPOT per request = (last token - first token)
/ (tokens - 1), the engine's own clock; the ratio is of the arms' medians. Arms alternate
(constrained first for even schemas, free first for odd) so that drift cancels. Every constrained
output is parsed and validated against its schema (jsonschema); `--samples` per schema at batch 8
(20: 200 outputs). The grammar compile time per schema (a fresh compiler, no cache) is printed.
Last line: `structured_tpot_ratio_b1=... structured_tpot_ratio_b8=... schema_valid=N/M`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema

from bench.local_engine import LocalEngine
from bench.quick import add_quick_flag, apply_quick, at_most
from bench.structured_schemas import SCHEMAS
from common.sampling_params import Constraint, SamplingParams
from common.structured_output import GrammarCompiler
from common.tokenizer import get_tokenizer

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks? Answer in JSON:"


def wrapped(schema: dict, items: int) -> dict:
    return {"type": "array", "items": schema, "minItems": items, "maxItems": items}


def run(engine: LocalEngine, params: list[SamplingParams]) -> list[tuple[list[int], str, float]]:
    """All at once; per request: tokens, text, TPOT (s)."""
    ids = [engine.add_request(PROMPT, p) for p in params]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.group_id] = out.sequence
    results = []
    for request_id in ids:
        seq = done[request_id]
        n = len(seq.output_token_ids)
        tpot = (seq.finish_time - seq.first_token_time) / (n - 1) if n > 1 else 0.0
        results.append((seq.output_token_ids, seq.output_text, tpot))
    return results


def arms(engine: LocalEngine, schema: dict, seeds: list[int], max_new_tokens: int, constrained_first: bool):
    """(constrained outputs, free outputs of as many tokens each). Free first needs the lengths
    first: the constrained run is then made once untimed (the same seeds give the same tokens)."""
    constraint = Constraint("json_schema", json.dumps(schema))
    with_grammar = [
        SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, seed=s, structured_output=constraint)
        for s in seeds
    ]

    def free_like(outputs):
        return [
            SamplingParams(max_new_tokens=max(len(tokens), 2), temperature=0.8, seed=s, ignore_eos=True)
            for s, (tokens, _, _) in zip(seeds, outputs, strict=True)
        ]

    if constrained_first:
        grammar_out = run(engine, with_grammar)
        return grammar_out, run(engine, free_like(grammar_out))
    free_out = run(engine, free_like(run(engine, with_grammar)))
    return run(engine, with_grammar), free_out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:gpt2")
    ap.add_argument("--items", type=int, default=10, help="array items per output (every output >= 64 tokens)")
    ap.add_argument("--samples", type=int, default=20, help="constrained outputs per schema at batch 8")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    add_quick_flag(ap, model="dummy:tiny", items=1, samples=8, max_new_tokens=at_most(160))
    args = apply_quick(ap.parse_args(argv))
    engine = LocalEngine(model=args.model, kv_budget_tokens=16384)
    vocab = engine.model.config.vocab_size
    tokenizer = get_tokenizer()
    compile_ms = []
    for schema in SCHEMAS.values():
        compiler = GrammarCompiler(tokenizer.encoding, vocab, tokenizer.eot_token_id)
        assert compiler.tokenizer is not None  # built once per compiler, not timed: a server builds it at start
        start = time.perf_counter()
        compiler.matcher(Constraint("json_schema", json.dumps(wrapped(schema, args.items))))
        compile_ms.append((time.perf_counter() - start) * 1000)
    run(engine, [SamplingParams(max_new_tokens=8, temperature=0)])  # warm-up
    tpot = {("b1", "grammar"): [], ("b1", "free"): [], ("b8", "grammar"): [], ("b8", "free"): []}
    valid = total = 0
    lengths = []
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        full = wrapped(schema, args.items)
        batches = [("b1", [1000 + i]), ("b1", [2000 + i])]
        seeds = [3000 + 100 * i + s for s in range(args.samples)]
        batches += [("b8", seeds[j : j + 8]) for j in range(0, len(seeds), 8)]
        for batch, batch_seeds in batches:
            grammar_out, free_out = arms(engine, full, batch_seeds, args.max_new_tokens, constrained_first=i % 2 == 0)
            tpot[(batch, "grammar")] += [t for _, _, t in grammar_out]
            tpot[(batch, "free")] += [t for _, _, t in free_out]
            for tokens, text, _ in grammar_out:
                lengths.append(len(tokens))
                if batch == "b8":
                    total += 1
                    try:
                        jsonschema.validate(json.loads(text), full)
                        valid += 1
                    except (ValueError, jsonschema.ValidationError):
                        print(f"invalid output for {name}: {text[:200]!r}")
        print(f"{name}: done ({len(lengths)} constrained outputs so far)", flush=True)
    med = {k: statistics.median(v) * 1000 for k, v in tpot.items()}
    print(f"grammar compile p50 {statistics.median(compile_ms):.2f} ms, max {max(compile_ms):.2f} ms (10 schemas)")
    print(f"constrained output tokens: min {min(lengths)}, median {statistics.median(lengths)}")
    print("| batch | TPOT p50 with grammar (ms) | without (ms) | ratio | goal |")
    print("|---|---|---|---|---|")
    for batch in ("b1", "b8"):
        ratio = med[(batch, "grammar")] / med[(batch, "free")]
        print(f"| {batch[1:]} | {med[(batch, 'grammar')]:.2f} | {med[(batch, 'free')]:.2f} | {ratio:.3f} | <= 1.10 |")
    print(
        f"structured_tpot_ratio_b1={med[('b1', 'grammar')] / med[('b1', 'free')]:.3f} "
        f"structured_tpot_ratio_b8={med[('b8', 'grammar')] / med[('b8', 'free')]:.3f} schema_valid={valid}/{total}"
    )


if __name__ == "__main__":
    main()
