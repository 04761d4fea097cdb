"""The serving benchmark's two transports to the gateway, and the paired comparison of them.

`bench.serve --backend grpc` streams Generate; `--backend openai-http` streams POST
/v1/completions (server-sent events, read with aiohttp as vLLM's benchmark does) with the same
token-id prompts and the same vLLM metrics:
TTFT = first token's chunk - send (its text may be empty: half a character), E2EL = last
chunk - send, TPOT = (E2EL - TTFT) / (output tokens -
1) with the output tokens from the usage chunk. `--backend both` measures what HTTP adds
(`compare_transports`): requests one at a time, each prompt sent over both transports in turn
(gRPC first for even requests, HTTP first for odd ones, so drift of the machine favours neither),
then the medians: `http_ttft_delta_ms` = TTFT p50 over HTTP - TTFT p50 over gRPC, beside the median
of the paired differences, and TPOT p50 over HTTP / over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time

import aiohttp
import grpc
import numpy as np
from tqdm import tqdm

from bench.workloads import Request
from gateway.client import auth_metadata
from rpc.v1 import gateway_pb2_grpc, generate_pb2

BACKENDS = ("grpc", "openai-http", "both")


async def one_http_request(
    session: aiohttp.ClientSession, base_url: str, req: Request, record, progress: tqdm, cache_salt: str = ""
) -> None:
    body = {
        "prompt": req.prompt_token_ids,
        "max_tokens": req.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_salt": cache_salt,
    }
    start = last = time.perf_counter()
    try:
        async with session.post(f"{base_url}/v1/completions", json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}"
            async for line in response.content:  # one server-sent event line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = event["error"]["code"]
                elif event.get("usage"):
                    usage = event["usage"]
                    record.output_tokens = usage["completion_tokens"]
                    record.prompt_tokens = usage["prompt_tokens"]
                    record.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                elif (
                    event["choices"] and event["choices"][0]["finish_reason"] is None
                ):  # a token (text may be held back)
                    now = time.perf_counter()
                    if math.isnan(record.ttft):
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
        record.e2el = last - start
    except aiohttp.ClientError as exc:
        record.error = type(exc).__name__
    progress.update(1)


async def one_grpc_request(
    stub, req: Request, record, progress: tqdm, cache_salt: str = "", metadata: list[tuple[str, str]] = ()
) -> None:
    message = generate_pb2.GenerateRequest(
        token_ids=generate_pb2.TokenIds(ids=req.prompt_token_ids),
        params=generate_pb2.SamplingParams(
            max_new_tokens=req.output_len, temperature=0, ignore_eos=True, cache_salt=cache_salt
        ),
    )
    start = last = time.perf_counter()
    try:
        async for response in stub.Generate(message, timeout=3600, metadata=metadata):
            if response.HasField("chunk") and response.chunk.token_ids:
                now = time.perf_counter()
                if record.output_tokens == 0:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
                record.output_tokens += len(response.chunk.token_ids)
            elif response.HasField("complete"):
                done = response.complete
                record.replica, record.prompt_tokens, record.cached_tokens = (
                    done.replica,
                    done.prompt_tokens,
                    done.cached_tokens,
                )
        record.e2el = last - start
    except grpc.aio.AioRpcError as exc:
        record.error = exc.code().name
    progress.update(1)


class Transports:
    """Open connections to one gateway over both transports (async context manager), with its API
    key and, for a TLS gateway, the certificate to verify it against. An empty `grpc_address` opens
    HTTP alone (a peer server that only speaks OpenAI's HTTP API: bench/serve_peers.py)."""

    def __init__(self, grpc_address: str, http_url: str, api_key: str = "", tls_ca_file: str = "") -> None:
        self.grpc_address, self.http_url = grpc_address, http_url.rstrip("/")
        self.api_key, self.tls_ca_file = api_key, tls_ca_file

    async def __aenter__(self) -> "Transports":
        if not self.grpc_address:
            self.channel = self.stub = None
        elif self.tls_ca_file:
            with open(self.tls_ca_file, "rb") as ca:
                credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
            self.channel = grpc.aio.secure_channel(self.grpc_address, credentials)
        else:
            self.channel = grpc.aio.insecure_channel(self.grpc_address)
        if self.channel is not None:
            self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.metadata = auth_metadata(self.api_key)
        # aiohttp, as vLLM's serving benchmark: its client costs ~0.35 ms a request here, httpx's ~1.3 ms
        ssl_context = ssl.create_default_context(cafile=self.tls_ca_file) if self.tls_ca_file else None
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context or True),
            timeout=aiohttp.ClientTimeout(total=3600),
            headers=dict(self.metadata),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.http.close()

    def send(self, backend: str, req: Request, record, progress: tqdm, cache_salt: str = ""):
        if backend == "grpc":
            return one_grpc_request(self.stub, req, record, progress, cache_salt, self.metadata)
        return one_http_request(self.http, self.http_url, req, record, progress, cache_salt)


def _ms(values) -> np.ndarray:
    return np.array(values, dtype=float) * 1000


async def paired_run(transports: Transports, requests: list[Request], gap_s: float, record_cls) -> dict:
    """Each request over both transports, one at a time, alternating which goes first. Each send
    has its own cache_salt: the second of a pair must not find the first's prompt cached."""
    records = {"grpc": [], "openai-http": []}
    with tqdm(total=2 * len(requests), desc="grpc/http pairs", unit="req") as progress:
        for i, req in enumerate(requests):
            for backend in ("grpc", "openai-http") if i % 2 == 0 else ("openai-http", "grpc"):
                record = record_cls()
                await transports.send(backend, req, record, progress, cache_salt=f"{i}/{backend}")
                records[backend].append(record)
                await asyncio.sleep(gap_s)
    return records


def report_pairs(records: dict) -> dict:
    """Medians per transport and of the paired differences; the last printed line is the
    machine-readable one."""
    pairs = [
        (g, h) for g, h in zip(records["grpc"], records["openai-http"], strict=False) if not g.error and not h.error
    ]
    failed = sum(bool(r.error) for rs in records.values() for r in rs)
    tpot = lambda r: (r.e2el - r.ttft) / (r.output_tokens - 1)  # noqa: E731
    ttft = {"grpc": _ms([g.ttft for g, _ in pairs]), "openai-http": _ms([h.ttft for _, h in pairs])}
    tpots = {"grpc": _ms([tpot(g) for g, _ in pairs]), "openai-http": _ms([tpot(h) for _, h in pairs])}
    paired = float(np.median(ttft["openai-http"] - ttft["grpc"]))
    delta = float(np.median(ttft["openai-http"]) - np.median(ttft["grpc"]))
    ratio = float(np.median(tpots["openai-http"]) / np.median(tpots["grpc"]))
    print(f"{len(pairs)} pairs ({failed} failed requests)")
    print("| transport | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | E2E p50 (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for name, index in (("gRPC", 0), ("OpenAI HTTP (SSE)", 1)):
        key = ("grpc", "openai-http")[index]
        e2e = _ms([p[index].e2el for p in pairs])
        print(
            f"| {name} | {np.median(ttft[key]):.2f} | {np.percentile(ttft[key], 90):.2f} | "
            f"{np.median(tpots[key]):.2f} | {np.median(e2e):.1f} |"
        )
    print(
        f"paired TTFT difference (HTTP - gRPC): median {paired:.2f} ms, "
        f"p10 {np.percentile(ttft['openai-http'] - ttft['grpc'], 10):.2f}, "
        f"p90 {np.percentile(ttft['openai-http'] - ttft['grpc'], 90):.2f}"
    )
    print(f"http_ttft_delta_ms={delta:.2f} http_ttft_paired_median_ms={paired:.2f} http_tpot_ratio={ratio:.3f}")
    return dict(
        http_ttft_delta_ms=delta,
        http_ttft_paired_median_ms=paired,
        http_tpot_ratio=ratio,
        pairs=len(pairs),
        failed=failed,
    )
