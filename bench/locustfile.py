"""Locust load test of the gateway's streaming Generate (closed loop: each user waits for its
answer before sending the next request).

    locust -f bench/locustfile.py --headless -u 16 -r 4 -t 60s --csv bench/results/locust --csv-full-history
    locust -f bench/locustfile.py            # web UI on http://localhost:8089

Each call reports two request types: `Generate TTFT` (time to the first streamed token) and
`Generate` (the whole stream; its response length is the number of output tokens). Failures
carry the gRPC status. The requests are drawn to fit the served model: the first user asks the
gateway (GetModelInfo) for its context length and vocabulary (bench/workloads.py). Settings (env
vars): GATEWAY_ADDRESS (default 127.0.0.1:50050, or --host), WORKLOAD (sharegpt-synth),
WORKLOAD_SEED (0), WORKLOAD_SIZE (1000 requests drawn), MAX_NEW_TOKENS (cap on the drawn output
lengths; default none), API_KEY (sent as `x-api-key` metadata when set; the gateway has no
authentication yet).
"""
from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # must run before any channel exists; grpc.aio does not work under gevent

import itertools  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from locust import User, constant, task  # noqa: E402

from bench.workloads import WORKLOADS, Request, served_model_limits  # noqa: E402
from rpc.v1 import gateway_pb2_grpc, generate_pb2  # noqa: E402

_MAX_NEW = int(os.environ["MAX_NEW_TOKENS"]) if os.environ.get("MAX_NEW_TOKENS") else None
_workload_lock = Semaphore()
_next_request = None


def next_request(gateway_address: str) -> Request:
    """The workload's next request (drawn once, for the model this gateway serves), round robin."""
    global _next_request
    with _workload_lock:
        if _next_request is None:
            requests = WORKLOADS[os.environ.get("WORKLOAD", "sharegpt-synth")](
                int(os.environ.get("WORKLOAD_SIZE", "1000")), seed=int(os.environ.get("WORKLOAD_SEED", "0")),
                limits=served_model_limits(gateway_address))
            _next_request = itertools.cycle(requests).__next__
    return _next_request()


class GatewayUser(User):
    wait_time = constant(0)
    host = os.environ.get("GATEWAY_ADDRESS", "127.0.0.1:50050")

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.host)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        key = os.environ.get("API_KEY")
        self.metadata = (("x-api-key", key),) if key else None

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, name: str, start: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exc, context={},
        )

    @task
    def generate(self) -> None:
        req = next_request(self.host)
        max_new = min(req.output_len, _MAX_NEW) if _MAX_NEW else req.output_len
        message = generate_pb2.GenerateRequest(
            token_ids=generate_pb2.TokenIds(ids=req.prompt_token_ids),
            params=generate_pb2.SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True),
        )
        start = time.perf_counter()
        tokens = 0
        try:
            for response in self.stub.Generate(message, timeout=600, metadata=self.metadata):
                if response.HasField("chunk") and response.chunk.token_ids:
                    if tokens == 0:
                        self._fire("Generate TTFT", start, 0, None)
                    tokens += len(response.chunk.token_ids)
        except grpc.RpcError as exc:
            self._fire("Generate", start, tokens, RuntimeError(f"{exc.code().name}: {exc.details()}"))
            return
        self._fire("Generate", start, tokens, None)
