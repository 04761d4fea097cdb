"""Stream a generation from the gateway and print its timings.

    python -m gateway.client "ROMEO:" --max-new-tokens 64 --temperature 0.8 --seed 1
    python -m gateway.client "ROMEO:" --api-key KEY --tls-ca cert.pem --address host:50050
Text goes to stdout as it arrives; timings (client-side, vLLM definitions) go to stderr. With
--n > 1 each sample's text is printed when it ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

from rpc.v1 import gateway_pb2_grpc, generate_pb2


def gateway_channel(address: str, tls_ca_file: str = "") -> grpc.Channel:
    """A channel to the gateway: TLS (verified against the CA/certificate in `tls_ca_file`) when
    given one, else plaintext."""
    if tls_ca_file:
        with open(tls_ca_file, "rb") as ca:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca.read()))
    return grpc.insecure_channel(address)


def auth_metadata(api_key: str) -> list[tuple[str, str]]:
    """The call metadata that carries an API key (none without one)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def stream_generate(
    address: str, prompt: str | list[int], timeout_s: float = 600, *, api_key: str = "", tls_ca_file: str = "", **params
):
    """Yield GenerateResponse messages; params are SamplingParams fields (None = server default)."""
    kwargs = {k: v for k, v in params.items() if v is not None}
    request = generate_pb2.GenerateRequest(params=generate_pb2.SamplingParams(**kwargs))
    if isinstance(prompt, str):
        request.text = prompt.encode("utf-8")
    else:
        request.token_ids.ids.extend(prompt)
    with gateway_channel(address, tls_ca_file) as channel:
        yield from gateway_pb2_grpc.GatewayStub(channel).Generate(
            request, timeout=timeout_s, metadata=auth_metadata(api_key)
        )


def _token_bias(text: str) -> tuple[int, float]:
    """`--logit-bias 50256=-100`: a token id and the bias added to its logit."""
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--address", default="127.0.0.1:50050")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--n", type=int, help="samples of the prompt")
    ap.add_argument("--cache-salt", help="prefix-cache namespace (requests share cached blocks only within one)")
    ap.add_argument("--presence-penalty", type=float)
    ap.add_argument("--frequency-penalty", type=float)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--min-tokens", type=int)
    ap.add_argument("--stop-token-id", type=int, action="append", dest="stop_token_ids")
    ap.add_argument("--logit-bias", type=_token_bias, action="append", metavar="ID=BIAS", help="e.g. 50256=-100")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY", ""),
        help="sent as 'authorization: Bearer <key>' (default: $OPENAI_API_KEY)",
    )
    ap.add_argument("--tls-ca", default="", help="PEM certificate(s) to verify a TLS gateway against")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    several = (args.n or 1) > 1
    texts: dict[int, str] = {}
    try:
        if not several:
            sys.stdout.write(args.prompt)
        for response in stream_generate(
            args.address,
            args.prompt,
            args.timeout,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            ignore_eos=args.ignore_eos or None,
            n=args.n,
            cache_salt=args.cache_salt,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            repetition_penalty=args.repetition_penalty,
            min_tokens=args.min_tokens,
            stop_token_ids=args.stop_token_ids,
            logit_bias=dict(args.logit_bias or []) or None,
            api_key=args.api_key,
            tls_ca_file=args.tls_ca,
        ):
            if response.HasField("chunk"):
                texts[response.chunk.index] = texts.get(response.chunk.index, "") + response.chunk.text
                if not several:
                    sys.stdout.write(response.chunk.text)
                    sys.stdout.flush()
            elif response.HasField("complete"):
                c = response.complete
                t = c.timings
                if several:
                    print(f"--- sample {c.index} ---\n{args.prompt}{texts.get(c.index, '')}")
                print(
                    f"\n\n[{c.finish_reason}] {c.prompt_tokens} prompt ({c.cached_tokens} cached) + "
                    f"{c.completion_tokens} generated tokens on {c.replica or 'compute'}: TTFT {t.ttft_ms:.1f} ms, "
                    f"TPOT {t.tpot_ms:.1f} ms, E2E {t.e2e_ms:.1f} ms, queue {t.queue_ms:.1f} ms "
                    f"(client wall {(time.perf_counter() - start) * 1000:.0f} ms)",
                    file=sys.stderr,
                )
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
