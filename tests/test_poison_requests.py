"""Nothing a client sends can change or end another client's stream. Real services on loopback
(memory, two compute replicas, a gateway with an API key and tight bounds: bench/isolation.py);
8 innocent greedy streams run, over and over, while each poison below is sent. Each poison gets a
clear status naming what is wrong, at once; the last test checks that every innocent run got
exactly its tokens alone, no replica was marked down or left by a migration, and no block leaked."""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.isolation import (
    API_KEY,
    FAULT_SALT,
    Innocents,
    isolation_stack,
    leaked_blocks,
    migrations,
    reference_outputs,
)
from gateway.client import auth_metadata, stream_generate
from rpc.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from tests.openai_stack import cancelled_requests

MODEL = "dummy:tiny"
HEADERS = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    expected = reference_outputs(MODEL, 160)
    with isolation_stack(str(tmp_path_factory.mktemp("poison")), MODEL) as stack:
        innocents = Innocents(stack, expected).start()
        time.sleep(1.0)  # they are running when the first poison arrives
        yield stack, innocents
        innocents.stop()


def replicas_state(stack) -> list[gateway_pb2.ReplicaRouting]:
    with grpc.insecure_channel(stack.grpc) as channel:
        stats = gateway_pb2_grpc.GatewayStub(channel).GetStats(
            gateway_pb2.StatsRequest(), timeout=10, metadata=auth_metadata(API_KEY)
        )
    return list(stats.replicas)


def grpc_error(stack, prompt, **params) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream_generate(stack.grpc, prompt, timeout_s=60, api_key=API_KEY, **params):
            pass
    return caught.value


def raw_generate(stack, body: bytes, key: str | None = API_KEY) -> grpc.RpcError:
    """The gateway's Generate called with raw bytes as its message."""
    with grpc.insecure_channel(stack.grpc) as channel:
        call = channel.unary_stream("/rpc.v1.Gateway/Generate")(
            body, timeout=30, metadata=auth_metadata(key) if key else None
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
    return caught.value


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1e-45, seed=1),
        dict(temperature=3.4e38, seed=2),
        dict(temperature=1e-20, top_p=1e-45, seed=3),
        dict(temperature=1e-30, top_k=1, logprobs=5, seed=4),
        dict(temperature=2.0, top_k=4294967295, top_p=1e-38, n=3),
    ],
)
def test_extreme_sampling_values_are_served(attack, params):
    stack, _ = attack
    finished = [
        r.complete
        for r in stream_generate(
            stack.grpc, "Poison values", timeout_s=60, api_key=API_KEY, max_new_tokens=8, ignore_eos=True, **params
        )
        if r.HasField("complete")
    ]
    assert [c.finish_reason for c in finished] == ["length"] * params.get("n", 1)
    assert all(c.num_migrations == 0 for c in finished)


def test_a_row_failure_ends_that_request_alone_and_is_not_migrated(attack):
    stack, _ = attack
    before = migrations(stack)
    error = grpc_error(stack, "Poison row", max_new_tokens=8, cache_salt=FAULT_SALT, n=2)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "request failed" in error.details() and "processing this request's output" in error.details()
    assert migrations(stack) == before
    assert all(r.serving for r in replicas_state(stack))


def test_echo_of_an_id_outside_the_vocabulary_is_a_400_naming_the_prompt(attack):
    stack, _ = attack
    reply = httpx.post(
        f"{stack.http}/v1/completions",
        headers=HEADERS,
        timeout=30,
        json={"prompt": [1, 2, 50257], "echo": True, "max_tokens": 2},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "prompt" and "[0, 50257)" in reply.json()["error"]["message"]


def test_sampling_values_that_shape_the_answer_are_checked_before_it_is_built(attack):
    """Found by bench.fuzz: an n of -5.5e27 reached the answer builder before validation (a 500)."""
    stack, _ = attack
    reply = httpx.post(
        f"{stack.http}/v1/chat/completions",
        headers=HEADERS,
        timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}], "n": -5549754830523851263189188608},
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"


def test_prompts_over_the_bound_are_refused_before_tokenizing(attack):
    stack, _ = attack
    started = time.monotonic()
    error = grpc_error(stack, "x" * 200_000, max_new_tokens=2)  # under the message limit, over 1024 x 128 bytes
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes of text" in error.details()
    error = grpc_error(stack, list(range(1024)), max_new_tokens=2)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1024 tokens" in error.details()
    assert time.monotonic() - started < 5
    reply = httpx.post(
        f"{stack.http}/v1/chat/completions",
        headers=HEADERS,
        timeout=30,
        json={"messages": [{"role": "user", "content": "y" * 200_000}]},
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"


def test_oversized_messages_and_bodies_are_refused(attack):
    stack, _ = attack
    error = grpc_error(stack, "z" * (2 << 20), max_new_tokens=2)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = httpx.post(
        f"{stack.http}/v1/completions",
        headers={**HEADERS, "content-type": "application/json"},
        content=json.dumps({"prompt": "w" * (2 << 20)}),
        timeout=30,
    )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the cap applies as the body arrives
        for _ in range(40):
            yield b" " * 65536

    reply = httpx.post(f"{stack.http}/v1/completions", headers=HEADERS, content=chunked(), timeout=30)
    assert reply.status_code == 413


def test_undecodable_messages_are_invalid_argument_and_unauthenticated_ones_are_not_read(attack):
    stack, _ = attack
    garbage = b"\xff\xff\xff\xff\x0f" * 8
    assert raw_generate(stack, garbage).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raw_generate(stack, garbage, key=None).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        raw_generate(stack, generate_pb2.GenerateRequest(text=b"hi").SerializeToString(), key="wrong").code()
        == grpc.StatusCode.UNAUTHENTICATED
    )


def http_socket(stack) -> socket.socket:
    host, port = stack.http.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_and_slow_bodies_are_cut_off(attack):
    stack, _ = attack
    with http_socket(stack) as slow_headers:
        slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # and never the rest
        started = time.monotonic()
        answer = read_all(slow_headers)
        assert answer.startswith(b"HTTP/1.1 408") and 1.5 < time.monotonic() - started < 8
    with http_socket(stack) as slow_body:
        slow_body.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
            + API_KEY.encode()
            + b'\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"prompt"'
        )
        started = time.monotonic()
        answer = read_all(slow_body)  # returns when the gateway closes the connection
        assert b" 408 " in answer.split(b"\r\n")[0] and b"request_timeout" in answer
        assert time.monotonic() - started < 4  # closed with the answer (the keep-alive would take 5 s more)
    with http_socket(stack) as idle_after_answer:  # after a response, stray bytes do not hold it open
        idle_after_answer.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        with pytest.raises(OSError):  # the gateway closes it: a send fails (broken pipe or reset)
            while time.monotonic() - started < 12:  # blank lines, which never begin a request
                idle_after_answer.sendall(b"\r\n")
                time.sleep(0.25)
        # after a response the bound is max(header 2 s, keep-alive 5 s), whatever bytes come: not never
        assert time.monotonic() - started < 7
    with http_socket(stack) as huge_headers:
        huge_headers.sendall(b"GET /health HTTP/1.1\r\nx-filler: " + b"a" * 100_000)
        assert read_all(huge_headers).startswith(b"HTTP/1.1 431")


def test_a_malformed_http_request_gets_a_json_400(attack):
    stack, _ = attack
    with http_socket(stack) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\x00\r\n\r\n")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b'"code": "bad_http_request"' in answer


def test_connections_and_calls_past_their_limits_are_refused_at_once(tmp_path):
    """A stack of its own: the limits count every open connection and call, innocents' included."""
    with isolation_stack(str(tmp_path), MODEL, replicas=1, http_max_connections="4", max_concurrent_rpcs="2") as stack:
        held = [http_socket(stack) for _ in range(4)]
        try:
            with http_socket(stack) as extra:
                answer = read_all(extra)
            assert answer.startswith(b"HTTP/1.1 429") and b"too_many_connections" in answer
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{stack.http}/health", timeout=10).status_code == 200  # room again
        long = dict(max_new_tokens=1000, n=16, ignore_eos=True, temperature=0)
        streams = [
            stream_generate(stack.grpc, "Hold the line", timeout_s=120, api_key=API_KEY, **long) for _ in range(2)
        ]
        for stream in streams:
            next(stream)  # both calls are running
        started = time.monotonic()
        error = grpc_error(stack, "one call too many", max_new_tokens=2)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 2
        with grpc.insecure_channel(stack.grpc) as channel:  # probes are never refused: no key, no slot
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
            assert next(watch).status == serving  # a stream written with context.write, through every guard
            watch.cancel()
        for stream in streams:
            stream.close()


def test_a_stream_whose_client_stops_reading_is_ended_and_frees_its_blocks(attack):
    stack, _ = attack
    cancelled_before = cancelled_requests(stack.metrics)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the gateway's sends back up
    host, port = stack.http.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    body = json.dumps(
        {
            "prompt": "A reader who fell asleep",
            "max_tokens": 1000,
            "n": 16,
            "logprobs": 5,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
    ).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
        + API_KEY.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    deadline = time.monotonic() + 30
    try:
        while cancelled_requests(stack.metrics) == cancelled_before:  # it ends long before 16 x 1000 tokens are read
            assert time.monotonic() < deadline, "the stalled stream still runs"
            time.sleep(0.5)
    finally:
        sock.close()


def test_innocents_were_untouched_and_nothing_leaked(attack):
    stack, innocents = attack
    runs, broken = innocents.stop()
    assert broken == [] and runs >= 16
    assert all(r.serving for r in replicas_state(stack))
    assert migrations(stack) == 0
    assert leaked_blocks(stack) == 0
