"""Structured outputs in the engine: every constrained output parses and validates (jsonschema,
an implementation nobody here wrote) or matches its regex, choice or grammar; the constraint
survives n > 1, preemption and a continuation from the tokens so far (token-exact); a free row
beside constrained ones is untouched; a sample cut by max_new_tokens ends with "length"."""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest
import torch

from bench.local_engine import LocalEngine
from bench.structured_schemas import SCHEMAS
from common.sampling_params import Constraint, FieldError, SamplingParams, sample_seed
from common.structured_output import GrammarLimits, compile_off_loop
from compute_service.grammar_masks import GrammarMasks

PROMPT = "ROMEO:\nBut soft, what light through yonder window"
EOS = 50256


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine(model="dummy:tiny", block_size=16, kv_budget_tokens=4096)


def constrained(constraint: Constraint, **values) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 256, "temperature": 0.8, **values}, structured_output=constraint)


def schema(name: str) -> Constraint:
    return Constraint("json_schema", json.dumps(SCHEMAS[name]))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sampled_output_validates_against_its_schema(engine, name):
    params = [constrained(schema(name), seed=seed) for seed in range(3)] + [constrained(schema(name), temperature=0)]
    for result in engine.generate([PROMPT] * len(params), params):
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), SCHEMAS[name])
        assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', result.text))  # no whitespace outside strings


def test_regex_choice_grammar_and_any_json_object(engine):
    cases = [
        (
            Constraint("regex", r"[A-Z][a-z]{2,8}, (my|thy) (lord|lady)\."),
            lambda t: re.fullmatch(r"[A-Z][a-z]{2,8}, (my|thy) (lord|lady)\.", t),
        ),
        (
            Constraint("choice", json.dumps(["Montague", "Capulet", "neither"])),
            lambda t: t in ("Montague", "Capulet", "neither"),
        ),
        (
            Constraint(
                "grammar", 'start: expr\nexpr: NUM | expr OP NUM | "(" expr ")"\nNUM: /[0-9]{1,3}/\nOP: "+" | "*"'
            ),
            balanced_expression,
        ),
        (Constraint("grammar", 'root ::= "yes" | "no"'), lambda t: t in ("yes", "no")),  # GBNF
        (Constraint("json_object"), lambda t: isinstance(json.loads(t), dict)),
    ]
    # Dummy weights pick tokens almost uniformly: any JSON object would run to the length, so a
    # greedy pick biased to "}" ends it (the constraint still decides the rest, "{" first of all).
    close = {engine.tokenizer.encode("}")[0]: 12.0}
    for constraint, ok in cases:
        extra = dict(logit_bias=close, temperature=0) if constraint.kind == "json_object" else {}
        params = [constrained(constraint, **{"seed": s, "max_new_tokens": 64, **extra}) for s in range(3)]
        for result in engine.generate([PROMPT] * 3, params):
            # "stop": nothing can follow; "eos": the model ended where the grammar allows it (an
            # expression may always go on with an operator, so it ends only so).
            assert result.finish_reason in ("stop", "eos") and ok(result.text), (constraint, result.text)


def balanced_expression(text: str) -> bool:
    """What the expression grammar above derives: numbers of 1-3 digits joined by + or *, with
    balanced parentheses around sub-expressions."""
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    flat = re.sub(r"[()]", "", text)
    return depth == 0 and re.fullmatch(r"[0-9]{1,3}([+*][0-9]{1,3})*", flat) is not None


def test_n_samples_each_follow_the_grammar_and_equal_single_requests(engine):
    c = schema("cast")
    together = engine.generate([PROMPT], [constrained(c, seed=11, n=3)])[0]
    assert len(together.samples) == 3
    for i, sample in enumerate(together.samples):
        jsonschema.validate(json.loads(sample.text), SCHEMAS["cast"])
        alone = engine.generate([PROMPT], [constrained(c, seed=sample_seed(11, i))])[0]
        assert alone.token_ids == sample.token_ids


def test_a_continuation_from_the_tokens_so_far_is_token_exact(engine):
    params = constrained(schema("matrix"), seed=5)
    whole = engine.generate([PROMPT], [params])[0]
    prompt = engine.encode_prompt(PROMPT)
    for cut in (1, 4, len(whole.token_ids) - 1):
        outputs = whole.token_ids[:cut]
        grammars = engine.compile_grammar(params, outputs)  # each sample's matcher, replayed over its tokens
        request_id = engine.enqueue_validated(prompt, params, output_token_ids=outputs, grammars=grammars)
        finished = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished and out.group_id == request_id:
                    finished = out.sequence
        assert finished is not None and finished.output_token_ids == whole.token_ids


def test_preemption_keeps_the_matcher_and_every_token():
    prompts, params = [PROMPT] * 6, [constrained(schema("cast"), seed=s, max_new_tokens=100) for s in range(6)]
    roomy = LocalEngine(model="dummy:tiny", block_size=16, kv_budget_tokens=4096)
    tight = LocalEngine(model="dummy:tiny", block_size=16, kv_budget_tokens=128, headroom_blocks_per_seq=0)  # 8 blocks
    expected = [r.token_ids for r in roomy.generate(prompts, params)]
    got = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [r.token_ids for r in got] == expected


def test_a_free_row_beside_constrained_rows_is_untouched(engine):
    free = SamplingParams(max_new_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    alone = engine.generate([PROMPT], [free])[0]
    mixed = engine.generate(
        [PROMPT] * 3, [constrained(schema("person"), seed=1), free, constrained(schema("tags"), seed=2)]
    )
    assert mixed[1].token_ids == alone.token_ids


def test_max_new_tokens_before_the_grammar_completes_is_length(engine):
    result = engine.generate([PROMPT], [constrained(schema("cast"), max_new_tokens=5)])[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("regex", "(("),
        Constraint("json_schema", "{not json"),
        Constraint("json_schema", "[1, 2]"),
        Constraint("grammar", "start: undefined_rule"),
        Constraint("choice", "[]"),
        Constraint("choice", '["a", 3]'),
        Constraint("xml", "<a/>"),
        Constraint("regex", "a" * 70000),
    ],
)
def test_an_invalid_constraint_is_refused_naming_the_field(engine, constraint):
    with pytest.raises(FieldError) as info:
        engine.add_request(PROMPT, constrained(constraint))
    assert info.value.field == "structured_output" and "structured_output" in str(info.value)
    assert not engine.has_unfinished()


def test_a_mask_that_fails_ends_its_own_row_alone(engine):
    """A matcher that breaks (here: not a matcher at all) leaves its row only EOS; the free row
    is untouched and a constrained one keeps its own mask."""
    masks = GrammarMasks(engine.model.config.vocab_size, EOS)
    good = engine.compile_grammar(constrained(Constraint("choice", '["aye", "nay"]')))[0]
    logits = torch.randn(3, engine.model.config.vocab_size)
    out = masks.apply(logits, masks.start([good, None, object()]))
    assert torch.equal(out[1], logits[1])
    assert 1 <= int(torch.isfinite(out[0]).sum()) <= 8  # the tokens that begin "aye" or "nay"
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [EOS]


def test_a_compile_past_its_time_limit_is_refused_naming_the_field():
    """grammar_compile_timeout_s bounds the wall time a compile may hold a request."""
    limits = GrammarLimits(compile_timeout_s=0.05)
    with pytest.raises(FieldError) as info:
        asyncio.run(compile_off_loop(lambda: time.sleep(0.5), limits))
    assert info.value.field == "structured_output" and "grammar_compile_timeout_s" in str(info.value)
    assert asyncio.run(compile_off_loop(lambda: 7, limits)) == 7
