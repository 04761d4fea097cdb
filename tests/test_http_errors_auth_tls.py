"""The HTTP front at the wire level (httpx and curl, no OpenAI client): every error case's status,
OpenAI JSON shape and `param`; API keys on both transports; a client that disconnects frees its
blocks; RESOURCE_EXHAUSTED is 429 and UNAVAILABLE 503; TLS round trips with a certificate made
here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import threading
import time

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.run_local import demo_client, start_service, start_serving, stop_service
from deploy.services import ServiceSpec, free_ports
from gateway.client import stream_generate
from tests.openai_stack import ENV_KEY, FILE_KEY, cancelled_requests, openai_stack, wait_until_idle

AUTH = {"authorization": f"Bearer {FILE_KEY}"}
MAX_IN_FLIGHT = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with openai_stack(tmp_path_factory.mktemp("http"), max_in_flight=str(MAX_IN_FLIGHT)) as s:
        yield s


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "top_k": 2**32}, "top_k"),  # past the protos' uint32: a 400, not a 500
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"50257": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": "x"}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "x", "stop_token_ids": [99999999]}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": list(range(17))}, "stop_token_ids"),
    (
        {
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 3}}},
        },
        "response_format",
    ),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
    ({"prompt": "x", "structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"prompt": "x", "structured_outputs": {"regex": "a" * 70000}}, "structured_outputs"),  # grammar_max_bytes
    (
        {"prompt": "x", "structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}},
        "structured_outputs",
    ),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 99999999]}, "prompt"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "to be " * 1000, "max_tokens": 1}, "prompt"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 9}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "name": "Romeo\nJULIET", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d"]}, "stop"),
]


def bad_requests() -> list[tuple[str, dict, str]]:
    """Each bad body streamed and not (a body that sets `stream` itself is sent once, as it is)."""
    bodies = [("completions", b, p) for b, p in BAD_COMPLETIONS] + [("chat/completions", b, p) for b, p in BAD_CHATS]
    return [
        (path, {"stream": stream, **body}, param)
        for path, body, param in bodies
        for stream in ((None,) if "stream" in body else (False, True))
    ]


@pytest.mark.parametrize("path,body,param", bad_requests())
def test_each_invalid_field_is_a_400_naming_it(stack, path, body, param):
    response = httpx.post(f"{stack['http']}/v1/{path}", json=body, headers=AUTH)
    error = assert_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    assert (
        param in error["message"]
        or param in ("unknown_field", "tools", "tool_choice")
        and "Unrecognized" in error["message"]
    )


def test_malformed_json_unknown_model_path_and_method(stack):
    assert_error(httpx.post(f"{stack['http']}/v1/completions", content=b"{nope", headers=AUTH), 400, None)
    assert_error(
        httpx.post(f"{stack['http']}/v1/completions", json={"prompt": "x", "model": "gpt-4"}, headers=AUTH),
        404,
        "model",
        "model_not_found",
    )
    assert_error(httpx.get(f"{stack['http']}/v1/nothing", headers=AUTH), 404, None)
    assert_error(httpx.get(f"{stack['http']}/v1/completions", headers=AUTH), 405, None)


def test_api_keys_on_http_and_grpc_and_open_health_and_metrics(stack):
    url = f"{stack['http']}/v1/completions"
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": FILE_KEY}, {"x-api-key": FILE_KEY}):
        assert_error(httpx.post(url, json=body, headers=headers), 401, None, "invalid_api_key")
    assert_error(httpx.get(f"{stack['http']}/v1/models"), 401, None, "invalid_api_key")
    assert_error(httpx.post(url, content=b"{not json"), 401, None, "invalid_api_key")  # the key comes first
    for key in (FILE_KEY, ENV_KEY):
        assert httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{stack['http']}/health").json()["status"] == "ok"
    # With keys the public port serves no /metrics (its per-tenant series name every tenant); the metrics port does.
    assert httpx.get(f"{stack['http']}/metrics").status_code == 404
    assert "gateway_requests_total" in httpx.get(f"{stack['metrics']}/metrics").text
    for key in ("", "wrong"):
        with pytest.raises(grpc.RpcError) as err:
            list(stream_generate(stack["grpc"], "x", 10, api_key=key, max_new_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(stream_generate(stack["grpc"], "x", 10, api_key=ENV_KEY, max_new_tokens=2))[-1].HasField("complete")
    with grpc.insecure_channel(stack["grpc"]) as channel:  # probes carry no key
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="rpc.v1.Gateway"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_tokenize_and_detokenize_in_vllms_shapes_behind_the_key(stack):
    url = stack["http"]
    answer = httpx.post(f"{url}/tokenize", json={"prompt": "But soft, what light"}, headers=AUTH).json()
    assert answer["count"] == len(answer["tokens"]) > 0 and answer["max_model_len"] > 0
    assert answer["token_strs"] is None
    text = httpx.post(f"{url}/detokenize", json={"tokens": answer["tokens"]}, headers=AUTH).json()
    assert text == {"prompt": "But soft, what light"}
    strs = httpx.post(f"{url}/tokenize", json={"prompt": "But soft", "return_token_strs": True}, headers=AUTH)
    assert "".join(strs.json()["token_strs"]) == "But soft"
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    assert httpx.post(f"{url}/tokenize", json=chat, headers=AUTH).json()["count"] > 1
    for path, body, param in (
        ("tokenize", {"prompt": "x", "messages": chat["messages"]}, "prompt"),
        ("tokenize", {"prompt": "to be " * 100000}, "prompt"),
        ("detokenize", {"tokens": [1, 99999999]}, "tokens"),
        ("detokenize", {"tokens": [1] * 5000}, "tokens"),
        ("detokenize", {"tokens": "1 2"}, "tokens"),
    ):
        assert_error(httpx.post(f"{url}/{path}", json=body, headers=AUTH), 400, param)
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 401, None, "invalid_api_key")
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [1]}), 401, None, "invalid_api_key")


def test_curl_streams_server_sent_events_ending_in_done(stack):
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{stack['http']}/v1/completions",
            "-H",
            f"Authorization: Bearer {FILE_KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"prompt": "ROMEO:", "max_tokens": 5, "stream": True, "ignore_eos": True}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    events = [line for line in out.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_a_client_that_disconnects_cancels_its_request_and_frees_its_blocks(stack):
    body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True}
    before = cancelled_requests(stack["metrics"])
    with httpx.stream("POST", f"{stack['http']}/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert grpc_in_flight(stack) == 1
    # the stream is closed mid-generation: the gateway cancels it and the replica frees its blocks
    wait_until_idle(stack["grpc"])
    assert cancelled_requests(stack["metrics"]) == before + 1
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up before the answer
        httpx.post(f"{stack['http']}/v1/completions", json=body, headers=AUTH, timeout=0.3)
    wait_until_idle(stack["grpc"])
    assert cancelled_requests(stack["metrics"]) == before + 2


def grpc_in_flight(stack) -> int:
    from tests.openai_stack import grpc_stats

    return grpc_stats(stack["grpc"]).requests_in_flight


def test_over_max_in_flight_is_429_at_once(stack):
    # n=4 samples each (the pool cannot hold all 12 at once): long enough on this tiny model that
    # all are still running at the fourth
    body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "stream": True, "n": 4}
    with httpx.Client(headers=AUTH, timeout=30) as client:
        streams = [client.stream("POST", f"{stack['http']}/v1/completions", json=body) for _ in range(MAX_IN_FLIGHT)]
        try:
            lines = []  # kept: an iterator dropped closes its response, which cancels the request
            for s in streams:
                response = s.__enter__()
                assert response.status_code == 200
                lines.append(response.iter_lines())
                next(lines[-1])  # each is generating
            start = time.monotonic()
            assert grpc_in_flight(stack) == MAX_IN_FLIGHT
            error = assert_error(
                client.post(f"{stack['http']}/v1/completions", json={**body, "stream": False}), 429, None
            )
            assert time.monotonic() - start < 1.0 and error["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    wait_until_idle(stack["grpc"])


def test_no_replica_is_503_on_requests_and_health(tmp_path):
    gateway, http, dead = free_ports(3)
    spec = ServiceSpec(
        "gateway",
        "gateway",
        "gateway.server",
        gateway,
        "rpc.v1.Gateway",
        {"http_port": str(http), "memory_address": "", "compute_addresses": f"127.0.0.1:{dead}", "metrics_port": "0"},
    )
    proc = start_service(spec, str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{http}/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "gateway.log").read_text()
                time.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        error = assert_error(httpx.post(f"http://127.0.0.1:{http}/v1/completions", json={"prompt": "x"}), 503, None)
        assert error["type"] == "service_unavailable_error"
    finally:
        stop_service(proc)


def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


def test_tls_round_trip_on_grpc_and_https(stack, tmp_path):
    cert, key = self_signed(tmp_path)
    gateway, http = free_ports(2)
    plain = next(s for s in stack["services"] if s.role == "gateway")
    spec = ServiceSpec(
        "gateway-tls",
        "gateway",
        "gateway.server",
        gateway,
        "rpc.v1.Gateway",
        {
            **plain.settings,
            "http_port": str(http),
            "metrics_port": "0",
            "tls_cert_file": cert,
            "tls_key_file": key,
            "drain_timeout_s": "2",  # its stop waits this long for the OpenAI client's keep-alive connection
        },
    )
    proc = start_serving(spec, str(tmp_path), timeout_s=60)  # the launcher's health wait, over TLS
    try:
        command, env = demo_client(spec, "ROMEO:")  # `make run`'s demo: key from the environment, not argv
        assert ENV_KEY not in " ".join(command) and env["OPENAI_API_KEY"] == ENV_KEY
        demo = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert demo.returncode == 0 and "generated tokens" in demo.stderr, demo.stderr
        address = f"127.0.0.1:{gateway}"
        params = dict(max_new_tokens=12, temperature=0, ignore_eos=True)
        over_tls = list(stream_generate(address, "ROMEO:", 30, api_key=FILE_KEY, tls_ca_file=cert, **params))
        in_clear = list(stream_generate(stack["grpc"], "ROMEO:", 30, api_key=FILE_KEY, **params))
        text = lambda responses: "".join(r.chunk.text for r in responses if r.HasField("chunk"))  # noqa: E731
        assert text(over_tls) == text(in_clear) and over_tls[-1].complete.completion_tokens == 12
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port
            list(stream_generate(address, "ROMEO:", 5, api_key=FILE_KEY, **params))
        client = openai.OpenAI(
            base_url=f"https://localhost:{http}/v1",
            api_key=FILE_KEY,
            max_retries=0,
            http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert)),
        )
        answer = client.completions.create(
            model="dummy:tiny", prompt="ROMEO:", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert answer.choices[0].text == text(in_clear)
        with pytest.raises(httpx.TransportError):  # an unverified server is refused
            httpx.get(f"https://localhost:{http}/health")
        assert (
            httpx.get(f"https://127.0.0.1:{http}/health", verify=ssl.create_default_context(cafile=cert)).status_code
            == 200
        )
    finally:
        stop_service(proc)


def test_a_failure_after_the_first_token_is_openai_json_or_an_error_event(tmp_path):
    """The only replica dies mid-request and no continuation is allowed: a whole answer is a 503
    in OpenAI's shape, a stream ends with an error event and [DONE]."""
    with openai_stack(tmp_path, max_migrations="0", replica_wait_s="1") as s:
        compute = s["procs"][1]
        body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "n": 4}
        with (
            httpx.Client(headers=AUTH, timeout=60) as client,
            client.stream("POST", f"{s['http']}/v1/completions", json={**body, "stream": True}) as streamed,
        ):
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: ")
            whole = threading.Thread(
                target=lambda: results.append(client.post(f"{s['http']}/v1/completions", json=body))
            )
            results: list[httpx.Response] = []
            whole.start()
            time.sleep(0.5)  # both are generating
            compute.kill()
            events = [line for line in lines if line.startswith("data: ")]
            whole.join(timeout=30)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["type"] == "service_unavailable_error" and set(error) == {"message", "type", "param", "code"}
        assert_error(results[0], 503, None)
