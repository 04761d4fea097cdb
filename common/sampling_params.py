"""What a client may ask of a generation, and the one set of rules every entry point applies.

No torch here: the gateway validates a request with exactly these functions before forwarding
it, and a compute replica validates what arrives with them once more (each process boundary
checks once). Every ValueError names the request field at fault.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

# Stop strings are searched in the decoded output at every decode step and held back from the
# stream until they can no longer match, so both their number and their length are bounded
# (OpenAI allows 4 stop sequences).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_N = 16  # samples per request: each holds its own blocks once they diverge
MAX_CACHE_SALT_CHARS = 256
MAX_LOGPROBS = 5  # alternatives reported per token (OpenAI's completions API allows 5)
MAX_TOP_K = (1 << 32) - 1  # the protos carry top_k as uint32 (any value >= the vocabulary = no filter)
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing float32 logits by a
# smaller one overflows to inf, and softmax turns that into NaN. The argmax is what such a
# temperature picks anyway, bar exact ties.
GREEDY_TEMPERATURE = 1e-5
# The rest of OpenAI's sampling surface, with OpenAI's bounds where it states them: logit_bias
# takes at most 300 tokens, each biased by [-100, 100]; presence and frequency penalties in
# [-2, 2]. repetition_penalty (HF's and vLLM's extension) in (0, 2], SGLang's bound: past it
# a model mostly emits tokens it has never seen. stop_token_ids: as many as stop strings allow
# texts, bounded so the engine's per-token check stays O(1)-ish.
MAX_LOGIT_BIAS_TOKENS = 300
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_STOP_TOKEN_IDS = 16


class FieldError(ValueError):
    """A request field that cannot be served, with the field's name (as SamplingParams and
    ClientRequest spell it), so every front can point its client at the field in its own words."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (structured outputs; compiled and enforced by
    common.structured_output). `spec`: the JSON schema as JSON text (json_schema), the regex
    (regex), the choices as a JSON list of strings (choice), Lark or GBNF text (grammar); empty for
    json_object (any JSON object)."""

    kind: str
    spec: str = ""

    def check(self) -> None:
        """Shape only, what needs no grammar engine (its size is a setting of the process that
        compiles it: common.structured_output): FieldError naming the field."""
        name = "structured_output"
        if self.kind not in CONSTRAINT_KINDS:
            raise FieldError(name, f"{name} must be one of {', '.join(CONSTRAINT_KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise FieldError(name, f"{name}: the {self.kind} must be text")
        if self.kind != "json_object" and not self.spec:
            raise FieldError(name, f"{name}: the {self.kind} is empty")


@dataclass
class TokenLogprobs:
    """The log probability of one sampled token and of the `logprobs` most likely tokens at its
    position, under the model's own distribution (log-softmax of the raw logits: before
    temperature, top-k and top-p, as vLLM's default)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # samples of the prompt: prefilled once, its blocks shared until they diverge
    # Prefix-cache namespace: blocks are shared only between requests with the same salt (tenants).
    # Not a sampling parameter, but it travels with them to every process that hashes blocks.
    cache_salt: str = ""
    logprobs: int | None = None  # None = none; k = the sampled token's logprob and the top k (k <= 5)
    # Logit processors (compute_service.logits_processors), applied before temperature / top-k /
    # top-p and before the greedy argmax; logprobs still report the model's raw distribution.
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF's: a token of prompt or output has its logit / (or x) this
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked, stop strings not matched, until this many
    stop_token_ids: list[int] = field(default_factory=list)  # sampling one ends the sample (finish "stop")
    structured_output: Constraint | None = None  # the output must match it (a grammar masks each token)

    @property
    def greedy(self) -> bool:
        """Picks the argmax: temperature 0, or one so small that it is 0 in effect (GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise FieldError(
                "max_new_tokens", f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise FieldError("temperature", f"temperature must be a number >= 0, got {self.temperature!r}")
        if math.isinf(self.temperature):
            raise FieldError("temperature", "temperature must be finite")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise FieldError("top_k", f"top_k must be an integer in [0, 2^32), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise FieldError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise FieldError("seed", f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise FieldError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise FieldError("stop", "stop must be a list of non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise FieldError("stop", f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise FieldError("n", f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not isinstance(self.cache_salt, str) or len(self.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise FieldError("cache_salt", f"cache_salt must be a string of at most {MAX_CACHE_SALT_CHARS} characters")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise FieldError("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        self._validate_processors()
        if self.structured_output is not None:
            if not isinstance(self.structured_output, Constraint):
                raise FieldError("structured_output", "structured_output must be a Constraint")
            self.structured_output.check()

    def _validate_processors(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise FieldError(name, f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        r = self.repetition_penalty
        if not _is_number(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise FieldError(
                "repetition_penalty", f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {r!r}"
            )
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise FieldError("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        for token, bias in self.logit_bias.items():
            if not _is_token_id(token):
                raise FieldError("logit_bias", f"logit_bias keys must be token ids, got {token!r}")
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                bound = f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
                raise FieldError("logit_bias", f"logit_bias values must be in {bound}, got {bias!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            bound = f"[0, max_new_tokens={self.max_new_tokens}]"
            raise FieldError("min_tokens", f"min_tokens must be an integer in {bound}, got {self.min_tokens!r}")
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise FieldError("stop_token_ids", f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
        if not all(_is_token_id(t) for t in self.stop_token_ids):
            raise FieldError("stop_token_ids", "stop_token_ids must be token ids (integers >= 0)")

    def token_ids_named(self) -> dict[str, list[int]]:
        """The token ids the params name, by field: checked against the vocabulary where it is known."""
        return {"logit_bias": list(self.logit_bias), "stop_token_ids": list(self.stop_token_ids)}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_MASK64 = (1 << 64) - 1
MAX_SEED = (1 << 63) - 1


def new_seed() -> int:
    """A seed for a request that brought none (the gateway reports it back, so it can be replayed)."""
    return secrets.randbits(63)


def position_seed(seed: int, position: int) -> int:
    """The seed of the draw that picks the token at `position` (its index in prompt + output).

    Every random draw of a sequence is a function of its seed and the position alone (splitmix64
    of the two), never of how many draws came before on which machine: a request continued on
    another replica as prompt + tokens so far samples exactly what the first one would have.
    """
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & MAX_SEED


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request with `seed` and n > 1. Sample 0 uses the request's
    own seed (so n = 1 and sample 0 of n draw the same tokens); sample i > 0 a splitmix64 mix of
    the seed and i, at a "position" no real token has (-1 - i). So sample i of a seeded request is
    reproducible, and equals a request with n = 1 and seed `sample_seed(seed, i)`: that is how a
    sample continues on another replica after a fault."""
    return seed if index == 0 else position_seed(seed, -1 - index)


def check_prompt_text(text: str | bytes, context_length: int, max_token_bytes: int, field_name: str = "prompt") -> None:
    """Refuse, before it is tokenized, a text longer than `context_length` of the longest token
    (`max_token_bytes`) would be: it cannot fit the context, whatever it tokenizes to. Costs O(1),
    or O(bound) for a text under the bound."""
    limit = context_length * max_token_bytes
    # A character is at least one UTF-8 byte: the length alone refuses most oversized texts.
    size = len(text) if isinstance(text, bytes) or len(text) > limit else len(text.encode("utf-8", "replace"))
    if size > limit:
        raise FieldError(
            field_name,
            f"{field_name} is {size} bytes of text; the {context_length}-token context "
            f"holds at most {limit} (the longest token is {max_token_bytes} bytes)",
        )


def check_prompt_ids(token_ids: list[int], context_length: int, vocab_size: int, field_name: str = "prompt") -> None:
    """Fewer ids than the context (checked first: O(1)), each an integer in [0, vocab_size):
    before an id is decoded or embedded anywhere."""
    if len(token_ids) >= context_length:
        raise FieldError(field_name, f"{field_name} has {len(token_ids)} tokens; the context is {context_length}")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in token_ids):
        raise FieldError(field_name, f"{field_name} token ids must be integers in [0, {vocab_size})")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, context_length: int, vocab_size: int) -> None:
    """ValueError naming the field, for a prompt and params that cannot run on this model."""
    if not prompt_token_ids:
        raise FieldError("prompt", "prompt must not be empty")
    check_prompt_ids(prompt_token_ids, context_length, vocab_size)
    params.validate()
    for name, ids in params.token_ids_named().items():
        if any(t >= vocab_size for t in ids):
            raise FieldError(name, f"{name} token ids must be in [0, {vocab_size})")
    if len(prompt_token_ids) + params.max_new_tokens > context_length:
        raise FieldError(
            "max_new_tokens",
            f"max_new_tokens={params.max_new_tokens} with a {len(prompt_token_ids)}-token prompt "
            f"exceeds the context of {context_length} tokens",
        )
