"""Before anything is timed: llama-server must generate what our stack generates.

A peer that runs a different model is not a peer. The first `new_tokens` greedy tokens of a few
prompts are asked of both servers (ours through the gateway's GenerateUnary with the top-2
logprobs, llama-server through its native /completion with `return_tokens`). Where the two first
differ, the divergence is accepted only if our top-2 logit gap there is under `max_gap` (5e-3):
random weights have near-ties that summation order decides (f32 logits of the two engines differ
by ~1e-3, bench/llama_cpp_peer.TOLERANCES). A top-2 logprob gap is the logit gap (one softmax
normalizer). Tokens after a divergence continue different prefixes and are not compared.
With ignore_eos our engine may emit end-of-text and go on, while llama-server masks it (its EOG
logit bias is -inf): where ours is end-of-text, theirs must be our runner-up there.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass

from common.tokenizer import EOT_TOKEN_ID

MAX_GAP = 5e-3


@dataclass(frozen=True)
class Greedy:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logprob at each position
    runner_up: list[int]  # the second most likely token at each position


@dataclass(frozen=True)
class Verdict:
    prompt: int
    diverged_at: int | None  # first position where the tokens differ; None = all agree
    gap: float  # our top-2 gap there (nan when they agree)
    eot_masked_at: int | None = None  # ours emitted end-of-text here, theirs our runner-up

    @property
    def ok(self) -> bool:
        return self.diverged_at is None or self.gap < MAX_GAP


def judge(prompt: int, ours: Greedy, theirs: list[int], max_gap: float = MAX_GAP) -> Verdict:
    """Where `theirs` first leaves `ours.tokens`, and whether our near-tie there excuses it. A
    shorter answer from either side is a divergence at its end (with no gap to excuse it)."""
    for k in range(max(len(ours.tokens), len(theirs))):
        if k >= len(ours.tokens) or k >= len(theirs):
            return Verdict(prompt, k, float("inf"))
        if ours.tokens[k] == EOT_TOKEN_ID and theirs[k] == ours.runner_up[k]:
            return Verdict(prompt, None, float("nan"), eot_masked_at=k)  # the prefixes differ from here on
        if ours.tokens[k] != theirs[k]:
            return Verdict(prompt, k, ours.gaps[k])
    return Verdict(prompt, None, float("nan"))


def ours_greedy(gateway: str, prompt: list[int], new_tokens: int, api_key: str = "") -> Greedy:
    """Our stack's greedy tokens and top-2 gaps (GenerateUnary, logprobs=2, ignore_eos)."""
    from gateway.client import auth_metadata, gateway_channel
    from rpc.v1 import gateway_pb2_grpc, generate_pb2

    request = generate_pb2.GenerateRequest(
        token_ids=generate_pb2.TokenIds(ids=prompt),
        params=generate_pb2.SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=2),
    )
    with gateway_channel(gateway, "") as channel:
        result = gateway_pb2_grpc.GatewayStub(channel).GenerateUnary(
            request, timeout=300, metadata=auth_metadata(api_key)
        )
    gaps = [lp.top_logprobs[0] - lp.top_logprobs[1] for lp in result.logprobs]
    return Greedy(list(result.token_ids), gaps, [lp.top_token_ids[1] for lp in result.logprobs])


def llama_server_greedy(url: str, prompt: list[int], new_tokens: int) -> list[int]:
    """llama-server's greedy tokens: /completion, temperature 0, ignore_eos, no prompt cache."""
    body = {
        "prompt": prompt,
        "n_predict": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_tokens": True,
        "cache_prompt": False,
    }
    request = urllib.request.Request(
        f"{url}/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return [int(t) for t in json.load(response)["tokens"]]


def check_agreement(gateway: str, url: str, prompts: list[list[int]], new_tokens: int = 16, api_key: str = "") -> None:
    """Raises SystemExit (the run stops before any timing) on a real disagreement; prints one
    line per prompt either way."""
    if not prompts:
        raise SystemExit("no prompt to check llama-server's agreement on: nothing is timed unchecked")
    verdicts = []
    for i, prompt in enumerate(prompts):
        ours, theirs = ours_greedy(gateway, prompt, new_tokens, api_key), llama_server_greedy(url, prompt, new_tokens)
        verdict = judge(i, ours, theirs)
        verdicts.append(verdict)
        if verdict.eot_masked_at is not None:
            print(
                f"agreement: prompt {i} ({len(prompt)} tokens): identical up to token {verdict.eot_masked_at}, where "
                "ours is end-of-text (ignore_eos) and llama-server's (which masks it) is our runner-up"
            )
        elif verdict.diverged_at is None:
            print(f"agreement: prompt {i} ({len(prompt)} tokens): first {len(theirs)} greedy tokens identical")
        else:
            k = verdict.diverged_at
            print(
                f"agreement: prompt {i} ({len(prompt)} tokens): diverge at token {k} (ours {ours.tokens[k : k + 1]}, "
                f"llama-server {theirs[k : k + 1]}), our top-2 logit gap {verdict.gap:.2e} "
                + ("< " if verdict.ok else ">= ")
                + f"{MAX_GAP:g}: "
                + ("a near-tie, accepted" if verdict.ok else "REAL DISAGREEMENT")
            )
    bad = [v for v in verdicts if not v.ok]
    if bad:
        raise SystemExit(
            f"llama-server disagrees with our stack on {len(bad)} of {len(verdicts)} prompts beyond near-ties: "
            "it is not running the same model; nothing is timed"
        )
