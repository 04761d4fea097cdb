"""Locust load test of the gateway, over gRPC (streaming Generate) or the OpenAI HTTP API
(streaming /v1/completions): the same workload, the same request names, either transport.
Closed loop: each user waits for its answer before sending the next request.

    locust -f bench/locustfile.py --headless -u 16 -r 4 -t 60s --csv bench/results/locust --csv-full-history
    TRANSPORT=http locust -f bench/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000
    locust -f bench/locustfile.py            # web UI on http://localhost:8089

Each call reports two request types: `Generate TTFT` (time to the first streamed token) and
`Generate` (the whole stream; its response length is the number of output tokens). Failures
carry the gRPC status, or the HTTP status and OpenAI error type. The requests are drawn to fit the
served model: the first user asks the gateway (GetModelInfo, or GET /v1/models) for its context
length and vocabulary (bench/workloads.py). Settings (env vars): TRANSPORT (grpc | http; default
grpc), GATEWAY_ADDRESS (default 127.0.0.1:50050 for gRPC, http://127.0.0.1:8000 for HTTP; or
--host), WORKLOAD (sharegpt-synth), WORKLOAD_SEED (0), WORKLOAD_SIZE (1000 requests drawn),
MAX_NEW_TOKENS (cap on the drawn output lengths; default none), API_KEY (sent as
`authorization: Bearer <key>`, on either transport), TLS_CA (a PEM certificate to verify a TLS
gateway against; gRPC then uses TLS, HTTP takes an https:// host).
"""

from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # must run before any channel exists; grpc.aio does not work under gevent

import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402
import requests  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from locust import User, constant, task  # noqa: E402

from bench.workloads import WORKLOADS, Request, served_model_limits  # noqa: E402
from gateway.client import auth_metadata, gateway_channel  # noqa: E402
from rpc.v1 import gateway_pb2_grpc, generate_pb2  # noqa: E402

_MAX_NEW = int(os.environ["MAX_NEW_TOKENS"]) if os.environ.get("MAX_NEW_TOKENS") else None
TRANSPORT = os.environ.get("TRANSPORT", "grpc")
if TRANSPORT not in ("grpc", "http"):
    raise SystemExit(f"TRANSPORT must be grpc or http, got {TRANSPORT!r}")
API_KEY = os.environ.get("API_KEY", "")
TLS_CA = os.environ.get("TLS_CA", "")
_workload_lock = Semaphore()
_next_request = None


def next_request(gateway_address: str) -> Request:
    """The workload's next request (drawn once, for the model this gateway serves), round robin."""
    global _next_request
    with _workload_lock:
        if _next_request is None:
            requests_ = WORKLOADS[os.environ.get("WORKLOAD", "sharegpt-synth")](
                int(os.environ.get("WORKLOAD_SIZE", "1000")),
                seed=int(os.environ.get("WORKLOAD_SEED", "0")),
                limits=served_model_limits(gateway_address, api_key=API_KEY, tls_ca_file=TLS_CA),
            )
            _next_request = itertools.cycle(requests_).__next__
    return _next_request()


class _GatewayUser(User):
    abstract = True
    wait_time = constant(0)

    def _fire(self, name: str, start: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=TRANSPORT,
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )

    def _request(self) -> tuple[Request, int]:
        req = next_request(self.host)
        return req, min(req.output_len, _MAX_NEW) if _MAX_NEW else req.output_len


class GatewayUser(_GatewayUser):
    """gRPC: streaming Generate."""

    abstract = TRANSPORT != "grpc"
    host = os.environ.get("GATEWAY_ADDRESS", "127.0.0.1:50050")

    def on_start(self) -> None:
        self.channel = gateway_channel(self.host, TLS_CA)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        req, max_new = self._request()
        message = generate_pb2.GenerateRequest(
            token_ids=generate_pb2.TokenIds(ids=req.prompt_token_ids),
            params=generate_pb2.SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True),
        )
        start = time.perf_counter()
        tokens = 0
        try:
            for response in self.stub.Generate(message, timeout=600, metadata=auth_metadata(API_KEY)):
                if response.HasField("chunk") and response.chunk.token_ids:
                    if tokens == 0:
                        self._fire("Generate TTFT", start, 0, None)
                    tokens += len(response.chunk.token_ids)
        except grpc.RpcError as exc:
            self._fire("Generate", start, tokens, RuntimeError(f"{exc.code().name}: {exc.details()}"))
            return
        self._fire("Generate", start, tokens, None)


class OpenAIHttpUser(_GatewayUser):
    """HTTP: streaming POST /v1/completions (server-sent events), prompt as token ids."""

    abstract = TRANSPORT != "http"
    host = os.environ.get("GATEWAY_ADDRESS", "http://127.0.0.1:8000")

    def on_start(self) -> None:
        self.session = requests.Session()
        self.session.verify = TLS_CA or True
        if API_KEY:
            self.session.headers["authorization"] = f"Bearer {API_KEY}"

    def on_stop(self) -> None:
        self.session.close()

    @task
    def generate(self) -> None:
        req, max_new = self._request()
        body = {
            "prompt": req.prompt_token_ids,
            "max_tokens": max_new,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        tokens, first_text, error = 0, False, None
        try:
            with self.session.post(
                f"{self.host.rstrip('/')}/v1/completions", json=body, stream=True, timeout=600
            ) as response:
                if response.status_code != 200:
                    error = RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                else:
                    for line in response.iter_lines():
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = RuntimeError(f"{event['error']['type']}: {event['error']['message']}")
                        elif event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
                        elif not first_text and any(c["finish_reason"] is None for c in event["choices"]):
                            self._fire("Generate TTFT", start, 0, None)
                            first_text = True
        except requests.RequestException as exc:
            error = exc
        self._fire("Generate", start, tokens, error)
