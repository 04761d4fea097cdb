"""Fuzz the gateway's edge while innocent streams run: nothing a client sends may end in a server
error, break another client's stream or leak a block.

    python -m bench.fuzz                       # the goal run: 10,000 generated requests
    python -m bench.fuzz --requests 300        # the short run `make test` does (tests/test_fuzz.py)

Starts its own stack (memory, two compute replicas, a gateway with an API key and tight bounds:
bench/isolation.py), runs the 8 innocent greedy streams throughout, and sends Hypothesis-generated
requests one after another, half over each front:
- HTTP: bodies drawn from the gateway's own OpenAPI schema (/openapi.json, `schema_values`),
  the same with one field replaced by arbitrary JSON, arbitrary JSON, and arbitrary bytes; to both
  POST routes and, now and then, other paths and methods.
- gRPC: GenerateRequest messages from field strategies (edge numbers, any text, ids in and out of
  the vocabulary), the same serialized and then mutated byte by byte, and arbitrary bytes.
Generated requests ask for at most 4 tokens and 2 samples (a value that is not a number is left as
drawn: it must be refused), so the run is about the edge, not decoding.

A server error is an HTTP 5xx, a connection dropped with no answer, an HTTP error whose body is
not OpenAI's JSON error, an `error`
event of type internal_error inside a stream, or a gRPC INTERNAL or UNKNOWN. Ends with one line:
    fuzz_requests=N server_errors=N innocent_broken=N leaked_blocks=N
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.isolation import API_KEY, Innocents, isolation_stack, leaked_blocks, reference_outputs
from bench.quick import add_quick_flag, apply_quick, at_most
from gateway.client import auth_metadata
from rpc.v1 import generate_pb2

MAX_TOKENS, MAX_N = 4, 2
ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
edge_ints = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1), st.sampled_from([2**31 - 1, 2**32 - 1]))
edge_floats = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1e-45, 1e-5, 1.0, 3.4e38, -0.0]))


def capped(route: str, body):
    """A generated body as the run may send it: a numeric token limit or n within the caps (a body
    with no token limit gets one), anything else left as drawn."""
    if not isinstance(body, dict):
        return body
    names = ["max_tokens"] if route == "/v1/completions" else ["max_tokens", "max_completion_tokens"]
    present = [name for name in names if name in body and body[name] is not None]
    for name in present or names[-1:]:
        value = body.get(name)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_TOKENS):
            body[name] = MAX_TOKENS if value is None else int(min(value, MAX_TOKENS))
    n = body.get("n")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > MAX_N:
        body["n"] = MAX_N
    return body


def schema_values(schema: dict, components: dict, depth: int = 0):
    """A strategy for the JSON values `schema` describes: the subset of JSON Schema that FastAPI's
    OpenAPI output uses (type, anyOf, enum/const, properties + required, items,
    additionalProperties, $ref), with optional properties drawn present or absent. (The
    hypothesis-jsonschema package does not run on this Hypothesis.)"""
    ref = schema.get("$ref", "")
    if ref:
        return schema_values(components[ref.rsplit("/", 1)[1]], components, depth + 1)
    if "anyOf" in schema:
        return st.one_of(*(schema_values(option, components, depth + 1) for option in schema["anyOf"]))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required", ()))
        props = {name: schema_values(sub, components, depth + 1) for name, sub in schema["properties"].items()}
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if kind == "object":
        values = schema.get("additionalProperties")
        inner = schema_values(values, components, depth + 1) if isinstance(values, dict) else json_values
        return st.dictionaries(st.text(max_size=8), inner, max_size=4)
    if kind == "array":
        items = schema.get("items")
        return st.lists(schema_values(items, components, depth + 1) if items else json_values, max_size=4)
    simple = {
        "string": st.text(max_size=60),
        "integer": edge_ints | st.integers(),
        "boolean": st.booleans(),
        "number": edge_floats | st.floats(),
        "null": st.none(),
    }
    return simple.get(kind, json_values)


PLAUSIBLE_SAMPLING = {
    "temperature": st.floats(0, 2) | st.sampled_from([0.0, 1e-45, 1e-6, 3.4e38]),
    "top_p": st.floats(1e-45, 1.0),
    "top_k": st.integers(0, 60000),
    "seed": st.integers(0, 2**63 - 1),
    "n": st.integers(1, MAX_N),
    "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "logprobs": st.integers(0, 5),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "cache_salt": st.text(max_size=20),
}


def _plausible(case) -> tuple[str, dict]:
    (route, body), prompt, sampling = case
    body = {
        k: v
        for k, v in body.items()
        if k
        not in (
            "stream_options",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
            "model",
            "suffix",
            "best_of",
            "echo",
            "logprobs",
            "top_logprobs",
            "max_tokens",
            "max_completion_tokens",
        )
    }
    body.update(sampling)
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else "hello"}]
        if "logprobs" in body:
            body["logprobs"], body["top_logprobs"] = True, body["logprobs"]
    else:
        body["prompt"] = prompt
    return route, body


def http_cases(openapi: dict):
    components = openapi["components"]["schemas"]
    valid = st.one_of(
        *(st.tuples(st.just(route), schema_values(components[name], components)) for route, name in ROUTES.items())
    )
    mutated = st.tuples(valid, st.text(max_size=20), json_values).map(
        lambda t: (t[0][0], {**t[0][1], (t[1] if t[1] else next(iter(t[0][1]), "prompt")): t[2]})
    )
    # Schema-valid bodies whose prompt and sampling values are also plausible: these get served,
    # so the run reaches the engine and the stream's end, not only validation.
    plausible = st.tuples(
        valid,
        st.one_of(st.text(min_size=1, max_size=200), st.lists(st.integers(0, 50256), min_size=1, max_size=30)),
        st.fixed_dictionaries({}, optional=PLAUSIBLE_SAMPLING),
    ).map(_plausible)
    anything = st.tuples(st.sampled_from(list(ROUTES)), json_values)
    raw = st.tuples(st.sampled_from(list(ROUTES)), st.binary(max_size=200))
    post = st.one_of(plausible, plausible, plausible, valid, mutated, mutated, anything, raw).map(
        lambda c: ("POST", c[0], c[1])
    )
    other = st.tuples(
        st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
        st.sampled_from(["/v1/models", "/health", "/v1/completions", "/v1/nope", "/", "/metrics"]),
        st.none(),
    )
    return st.one_of(post, post, post, other).map(lambda c: ("http", *c))


def _message(text, ids, use_ids, params: dict) -> bytes:
    request = generate_pb2.GenerateRequest(params=generate_pb2.SamplingParams(**params))
    if use_ids:
        request.token_ids.ids.extend(ids)
    elif text is not None:
        request.text = text
    return request.SerializeToString()


def grpc_cases():
    params = st.fixed_dictionaries(
        {"max_new_tokens": st.integers(0, MAX_TOKENS)},
        optional={
            "temperature": edge_floats,
            "top_k": edge_ints,
            "top_p": edge_floats,
            "seed": st.integers(0, 2**64 - 1),
            "stop": st.lists(st.text(max_size=70), max_size=6),
            "ignore_eos": st.booleans(),
            "n": st.integers(0, MAX_N),
            "cache_salt": st.text(max_size=300),
            "logprobs": st.integers(0, 8),
        },
    )
    ids = st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 50256), max_size=40)
    messages = st.builds(
        _message,
        st.none() | st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
        ids,
        st.booleans(),
        params,
    )
    mutated = st.tuples(
        messages, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)
    ).map(_mutate)
    plausible = st.builds(
        _message,
        st.text(min_size=1, max_size=200).map(str.encode),
        st.lists(st.integers(0, 50256), min_size=1, max_size=30),
        st.booleans(),
        st.fixed_dictionaries(
            {"max_new_tokens": st.integers(1, MAX_TOKENS)},
            optional={k: v for k, v in PLAUSIBLE_SAMPLING.items() if k not in ("stream",)},
        ),
    )
    return st.one_of(plausible, plausible, messages, mutated, st.binary(max_size=200)).map(lambda b: ("grpc", b))


def _mutate(case: tuple[bytes, list[tuple[int, int]]]) -> bytes:
    data, edits = bytearray(case[0]), case[1]
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    return bytes(data)


@dataclass
class Tally:
    requests: int = 0
    server_errors: int = 0
    outcomes: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)  # HTTP 4xx by the field (or code) they named
    refusal_examples: dict[str, str] = field(default_factory=dict)  # one message of each
    examples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.server_errors += 1
        if len(self.examples) < 20:
            self.examples.append(what)


def send_http(client: httpx.Client, method: str, path: str, body, tally: Tally) -> None:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(capped(path, body)).encode()
    try:
        reply = client.request(method, path, content=content, headers={"content-type": "application/json"})
    except httpx.TransportError as exc:  # the server dropped the connection: no answer is a failure too
        tally.outcomes["http no answer"] += 1
        tally.error(f"no HTTP answer ({type(exc).__name__}) for {method} {path} {content[:200]!r}")
        return
    tally.outcomes[f"http {reply.status_code}"] += 1
    text = reply.text
    if reply.status_code >= 500:
        tally.error(f"HTTP {reply.status_code} for {method} {path} {content[:200]!r}: {text[:200]}")
    elif reply.status_code >= 400 and path.startswith("/v1/"):
        try:
            error = reply.json()["error"]
            assert isinstance(error["message"], str) and error["type"]
            key = f"{reply.status_code} {error.get('param') or error.get('code')}"
            tally.refusals[key] += 1
            tally.refusal_examples.setdefault(key, error["message"][:120])
        except Exception:
            tally.error(f"HTTP {reply.status_code} without a JSON error for {method} {path}: {text[:200]}")
    elif "text/event-stream" in reply.headers.get("content-type", "") and '"internal_error"' in text:
        tally.error(f"stream with an internal error for {content[:200]!r}: {text[-300:]}")


def send_grpc(channel: grpc.Channel, body: bytes, tally: Tally) -> None:
    call = channel.unary_stream("/rpc.v1.Gateway/Generate")
    try:
        for _ in call(body, timeout=60, metadata=auth_metadata(API_KEY)):
            pass
        tally.outcomes["grpc OK"] += 1
    except grpc.RpcError as exc:
        tally.outcomes[f"grpc {exc.code().name}"] += 1
        if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            tally.error(f"gRPC {exc.code().name} for {body[:200]!r}: {exc.details()}")


def fuzz(stack, num_requests: int, seed: int) -> Tally:
    tally = Tally()
    openapi = httpx.get(f"{stack.http}/openapi.json", timeout=10).json()
    cases = st.one_of(http_cases(openapi), grpc_cases())
    with (
        httpx.Client(base_url=stack.http, timeout=60, headers={"authorization": f"Bearer {API_KEY}"}) as client,
        grpc.insecure_channel(stack.grpc) as channel,
    ):

        @settings(
            max_examples=num_requests,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            derandomize=False,
        )
        @given(case=cases)
        def one(case) -> None:
            tally.requests += 1
            if case[0] == "http":
                send_http(client, *case[1:], tally)
            else:
                send_grpc(channel, case[1], tally)

        one._hypothesis_internal_use_seed = seed
        one()
    return tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--model", default="dummy:tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--innocent-tokens", type=int, default=64)
    ap.add_argument("--log-dir", default="", help="the services' logs (default: a temporary folder)")
    add_quick_flag(ap, requests=at_most(20), innocent_tokens=at_most(8))
    args = apply_quick(ap.parse_args(argv))
    expected = reference_outputs(args.model, args.innocent_tokens)
    with tempfile.TemporaryDirectory() as tmp, isolation_stack(args.log_dir or tmp, args.model) as stack:
        innocents = Innocents(stack, expected).start()
        started = time.monotonic()
        tally = fuzz(stack, args.requests, args.seed)
        elapsed = time.monotonic() - started
        runs, broken = innocents.stop()
        leaked = leaked_blocks(stack)
    print(f"{tally.requests} requests in {elapsed:.0f} s ({tally.requests / elapsed:.1f}/s); innocent runs {runs}")
    print("outcomes: " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.outcomes.items())))
    print("HTTP refusals, most common (one message each):")
    for key, count in tally.refusals.most_common(10):
        print(f"  {key} x{count}: {tally.refusal_examples[key]}")
    for example in tally.examples + broken[:20]:
        print("  " + example)
    print(
        f"fuzz_requests={tally.requests} server_errors={tally.server_errors} innocent_broken={len(broken)} "
        f"leaked_blocks={leaked}"
    )
    return 0 if tally.server_errors == 0 and not broken and leaked == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
