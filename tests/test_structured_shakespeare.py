"""Structured outputs where they matter, on the default model (Shakespeare, trained here) through
the official `openai` client: 20 sampled completions (temperature 0.8) for each of the ten JSON
schemas of bench.structured_schemas via `response_format`, and for a regex, a choice list and a
grammar via `structured_outputs`. Every one must end on its own (`finish_reason` "stop"; "length"
counts as invalid) and parse and validate (jsonschema) or match."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from bench.structured_schemas import SCHEMAS
from tests.openai_stack import FILE_KEY, openai_stack

SAMPLES, N = 20, 4  # 20 completions per constraint: 5 requests of n = 4


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with openai_stack(tmp_path_factory.mktemp("shakespeare"), compute_settings={"model": "shakespeare"}) as stack:
        yield openai.OpenAI(base_url=f"{stack['http']}/v1", api_key=FILE_KEY, max_retries=0)


def completions(client, extra: dict, seed: int) -> list:
    answer = client.chat.completions.create(
        model="shakespeare",
        messages=[{"role": "user", "name": "Romeo", "content": "Answer me in the form I ask."}],
        max_tokens=200,
        temperature=0.8,
        seed=seed,
        n=N,
        **extra,
    )
    return answer.choices


def all_choices(client, extra: dict) -> list:
    with ThreadPoolExecutor(4) as pool:
        return [
            c for choices in pool.map(lambda s: completions(client, extra, s), range(SAMPLES // N)) for c in choices
        ]


def test_200_of_200_json_schema_completions_parse_and_validate(client):
    valid, seen = 0, []
    for name, schema in SCHEMAS.items():
        extra = {
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        }
        for choice in all_choices(client, extra):
            text = choice.message.content
            try:
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (AssertionError, ValueError, jsonschema.ValidationError):
                seen.append((name, choice.finish_reason, text[:120]))
    assert valid == SAMPLES * len(SCHEMAS), seen


@pytest.mark.parametrize(
    "outputs,matches",
    [
        ({"regex": r"(ROMEO|JULIET|FRIAR): [A-Za-z ,']{1,40}[.!?]"}, r"(ROMEO|JULIET|FRIAR): [A-Za-z ,']{1,40}[.!?]"),
        ({"choice": ["Montague", "Capulet", "Verona"]}, r"Montague|Capulet|Verona"),
        (
            {"grammar": 'start: NAME " loves " NAME\nNAME: "Romeo" | "Juliet" | "Rosaline" | "Paris"'},
            r"(Romeo|Juliet|Rosaline|Paris) loves (Romeo|Juliet|Rosaline|Paris)",
        ),
    ],
)
def test_regex_choice_and_grammar_completions_all_match(client, outputs, matches):
    choices = all_choices(client, {"extra_body": {"structured_outputs": outputs}})
    assert len(choices) == SAMPLES
    bad = [
        (c.finish_reason, c.message.content)
        for c in choices
        if c.finish_reason != "stop" or not re.fullmatch(matches, c.message.content)
    ]
    assert not bad, bad
