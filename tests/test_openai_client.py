"""The official `openai` Python client against a live stack's HTTP front: completions and chat,
streamed and not, n=2, stop, seeds, logprobs; greedy text equal to what gRPC Generate returns."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest

from common.tokenizer import get_tokenizer
from gateway.chat_template import ChatMessage, render
from gateway.client import auth_metadata
from gateway.openai_answer import token_string
from rpc.v1 import gateway_pb2_grpc, generate_pb2
from tests.openai_stack import ENV_KEY, FILE_KEY, openai_stack, wait_until_idle

PROMPT = "ROMEO:\nBut soft, what light"
MODEL = "dummy:tiny"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with openai_stack(tmp_path_factory.mktemp("openai")) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack['http']}/v1", api_key=FILE_KEY, max_retries=0)


def grpc_unary(stack, prompt, **params) -> generate_pb2.GenerateResult:
    request = generate_pb2.GenerateRequest(text=prompt.encode(), params=generate_pb2.SamplingParams(**params))
    with grpc.insecure_channel(stack["grpc"]) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).GenerateUnary(request, timeout=60, metadata=auth_metadata(ENV_KEY))


def test_greedy_completion_equals_grpc_generate_streamed_or_not(stack, client):
    expected = grpc_unary(stack, PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True)
    answer = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.object == "text_completion" and answer.model == MODEL
    assert answer.choices[0].text == expected.text and answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == expected.complete.prompt_tokens
    assert answer.usage.completion_tokens == 24 and answer.usage.total_tokens == answer.usage.prompt_tokens + 24
    assert answer.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # a token-id prompt is the same request
    ids = list(get_tokenizer().encode(PROMPT))
    by_ids = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == expected.text
    wait_until_idle(stack["grpc"])


def test_repeated_prompt_reports_cached_tokens(stack, client):
    prompt = "To be, or not to be, that is the question: " * 6  # several full blocks
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_chat_applies_the_speaker_template_and_equals_grpc(stack, client):
    messages = [
        {"role": "system", "content": "A street in Verona."},
        {"role": "user", "name": "Romeo", "content": "What light through yonder window breaks?"},
    ]
    prompt = render([ChatMessage(m["role"], m["content"], m.get("name", "")) for m in messages])
    assert prompt.endswith("ROMEO:\nWhat light through yonder window breaks?\n\nASSISTANT:\n")
    expected = grpc_unary(stack, prompt, max_new_tokens=20, temperature=0, stop=["\n\n"])
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == (
        "stop" if expected.complete.finish_reason in ("stop", "eos") else "length"
    )
    assert answer.usage.prompt_tokens == len(get_tokenizer().encode(prompt))
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_2_with_a_seed_is_reproducible_and_another_seed_differs(stack, client):
    def run(seed):
        answer = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, seed=seed, extra_body={"ignore_eos": True}
        )
        assert sorted(c.index for c in answer.choices) == [0, 1]
        assert answer.usage.completion_tokens == 32
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]

    first = run(5)
    assert first == run(5)
    assert first[0] != first[1]
    assert run(6) != first
    # sample 0 of n=2 draws what n=1 with the same seed draws (the seed rule of the gRPC API)
    single = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=5, extra_body={"ignore_eos": True}
    )
    assert single.choices[0].text == first[0]
    streamed = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=16,
            temperature=1.0,
            n=2,
            seed=5,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert texts == first


def test_stop_string_ends_the_text_before_it(stack, client):
    full = (
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].text == full[: full.find(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_logprobs_have_openai_shape_and_equal_the_grpc_values(stack, client):
    expected = grpc_unary(stack, PROMPT, max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    assert len(expected.logprobs) == 8 and all(len(lp.top_token_ids) == 3 for lp in expected.logprobs)
    answer = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = answer.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    tokenizer = get_tokenizer()
    assert lp.tokens == [token_string(tokenizer, t) for t in expected.token_ids]  # bytes:\xNN for part of a character
    assert answer.choices[0].text == expected.text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in expected.logprobs], abs=1e-6)
    for top, want in zip(lp.top_logprobs, expected.logprobs, strict=False):
        assert top == pytest.approx(
            {token_string(tokenizer, t): v for t, v in zip(want.top_token_ids, want.top_logprobs, strict=False)},
            abs=1e-6,
        )
        assert max(top.values()) >= want.logprob - 1e-6  # greedy: the sampled token is the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        stop=["never-seen"],
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 and entry.bytes for entry in content)


def test_models_and_errors_through_the_client(stack, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, top_p=0)
    assert err.value.body["param"] == "top_p"
    anonymous = openai.OpenAI(base_url=f"{stack['http']}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.completions.create(model=MODEL, prompt="x", max_tokens=2)
    env_keyed = openai.OpenAI(base_url=f"{stack['http']}/v1", api_key=ENV_KEY, max_retries=0)
    assert env_keyed.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_echo_user_and_top_k(stack, client):
    """`echo` puts the prompt's text first (whole answer and the stream's first chunk), `user` is
    accepted, and `top_k=1` samples the most likely token, so a seeded draw equals greedy."""
    greedy = (
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    echoed = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        echo=True,
        user="tester-1",
        extra_body={"ignore_eos": True},
    )
    assert echoed.choices[0].text == PROMPT + greedy
    assert echoed.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            echo=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT + greedy
    for seed in (1, 2):
        top1 = client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True, "top_k": 1},
        )
        assert top1.choices[0].text == greedy
    sampled = {
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True, "top_k": 50},
        )
        .choices[0]
        .text
        for seed in (1, 2, 3)
    }
    assert sampled != {greedy}  # top_k=50 does sample: the equality above is top_k's doing


def test_streamed_stop_logprobs_and_chat_usage(stack, client):
    """What the whole answers above check, streamed: a stop string, logprobs per chunk, and the
    usage chunk of a chat stream."""
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    full = whole.choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=30,
            temperature=0,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((lp.tokens for lp in streamed), []) == whole.choices[0].logprobs.tokens
    assert sum((lp.token_logprobs for lp in streamed), []) == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert sum((lp.text_offset for lp in streamed), []) == whole.choices[0].logprobs.text_offset
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
    whole_chat = client.chat.completions.create(**request)
    chat = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == whole_chat.usage.completion_tokens
    assert chat[-1].usage.prompt_tokens == whole_chat.usage.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == whole_chat.choices[0].message.content
    assert all(c.usage is None for c in chat[:-1])


def test_penalties_bias_min_tokens_and_stop_token_ids_through_both_fronts(stack, client):
    """Each field reaches the sampler from HTTP and gRPC alike (the same greedy text), and acts: the
    biased token is held back by min_tokens (it is also a stop token), then wins and stops."""
    tokenizer = get_tokenizer()
    forced = tokenizer.encode(" Juliet")[0]
    values = dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.3, min_tokens=3)
    expected = grpc_unary(
        stack, PROMPT, max_new_tokens=12, temperature=0, logit_bias={forced: 100.0}, stop_token_ids=[forced], **values
    )
    assert list(expected.token_ids)[3:] == [forced] and forced not in list(expected.token_ids)[:3]
    assert expected.complete.finish_reason == "stop" and expected.text == tokenizer.decode(expected.token_ids[:3])
    answer = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=1.0,
        logit_bias={str(forced): 100},
        extra_body={"repetition_penalty": 1.3, "min_tokens": 3, "stop_token_ids": [forced]},
    )
    assert answer.choices[0].text == expected.text and answer.choices[0].finish_reason == "stop"
    biased_eos = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logit_bias={"50256": 100}, extra_body={"min_tokens": 2}
    )
    assert biased_eos.usage.completion_tokens == 3 and biased_eos.choices[0].finish_reason == "stop"


def test_structured_outputs_through_both_fronts(stack, client):
    """response_format (OpenAI) and structured_outputs (vLLM) over HTTP, StructuredOutput over
    gRPC: each output matches; the same greedy constraint gives the same text on both fronts."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "act": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["name", "act"],
        "additionalProperties": False,
    }
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Who speaks?"}],
        max_tokens=64,
        temperature=0.8,
        seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "speaker", "schema": schema, "strict": True}},
    )
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    greedy = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=64, temperature=0, extra_body={"structured_outputs": {"json": schema}}
    )
    over_grpc = grpc_unary(
        stack,
        PROMPT,
        max_new_tokens=64,
        temperature=0,
        structured_output=generate_pb2.StructuredOutput(json_schema=json.dumps(schema)),
    )
    assert greedy.choices[0].text == over_grpc.text and over_grpc.complete.finish_reason == "stop"
    jsonschema.validate(json.loads(over_grpc.text), schema)
    for outputs, ok in (
        ({"regex": "[A-Z][a-z]{1,6}!"}, lambda t: re.fullmatch("[A-Z][a-z]{1,6}!", t)),
        ({"choice": ["aye", "nay"]}, lambda t: t in ("aye", "nay")),
        ({"grammar": 'start: "to be" | "not to be"'}, lambda t: t in ("to be", "not to be")),
    ):
        answers = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0.8, n=3, extra_body={"structured_outputs": outputs}
        )
        assert all(c.finish_reason == "stop" and ok(c.text) for c in answers.choices), (outputs, answers)
    close = str(get_tokenizer().encode("}")[0])  # dummy weights: any JSON object would run to the length
    for extra in ({"structured_outputs": {"json_object": True}}, {"response_format": {"type": "json_object"}}):
        answer = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, logit_bias={close: 12}, extra_body=extra
        )
        assert answer.choices[0].finish_reason == "stop" and json.loads(answer.choices[0].text) == {}
    streamed = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=48,
        stream=True,
        extra_body={"structured_outputs": {"choice": ["aye", "nay"]}},
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) in ("aye", "nay")
