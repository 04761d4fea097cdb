"""Structured outputs, the grammar side: a request's constraint (a JSON schema, any JSON object, a
regex, a list of choices, a Lark or GBNF grammar) as an llguidance grammar, validated under
bounded limits and cached by content. No torch here: the gateway validates a constraint before
anything is queued (and refuses a bad one naming the field); a replica builds the matchers its
sequences advance token by token (compute_service.grammar_masks applies their masks).

Why llguidance (measured against xgrammar in docs/benchmarks.md): no runtime dependencies (xgrammar
imports transformers, which is test-only here), its tokenizer is built from our own tiktoken
encoding with nothing downloaded, compiles and masks are cheap and release the GIL, and its
fuel limits bound what one grammar can cost (`LLParserLimits`).

JSON is compiled without free-form whitespace (a small model's classic runaway is newlines);
the schema's own "x-guidance" options, if any, override that.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, TypeVar

from common.sampling_params import Constraint, FieldError
from common.tokenizer import get_tokenizer

T = TypeVar("T")
FIELD = "structured_output"  # SamplingParams' name for it (the HTTP front renames it for its client)
MAX_CHOICES = 256


def grammar_text(constraint: Constraint) -> str:
    """The constraint as llguidance grammar text (not yet validated against the tokenizer)."""
    import llguidance  # noqa: PLC0415 - only processes that constrain need the engine loaded

    kind, spec = constraint.kind, constraint.spec
    try:
        if kind in ("json_schema", "json_object"):
            schema = json.loads(spec) if kind == "json_schema" else {"type": "object"}
            if not isinstance(schema, dict):
                raise FieldError(FIELD, f"{FIELD}: a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            choices = json.loads(spec)
            if not (isinstance(choices, list) and 0 < len(choices) <= MAX_CHOICES):
                raise FieldError(FIELD, f"{FIELD}: choice takes 1 to {MAX_CHOICES} strings")
            if not all(isinstance(c, str) and c for c in choices):
                raise FieldError(FIELD, f"{FIELD}: every choice must be a non-empty string")
            return llguidance.grammar_from("choice", json.dumps(choices))
        return llguidance.grammar_from("grammar", spec)  # Lark as is; GBNF (`::=`) converted
    except FieldError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:  # bad JSON (or nested past the parser), bad GBNF
        raise FieldError(FIELD, f"{FIELD}: invalid {kind}: {str(exc)[:300]}") from None


@dataclass(frozen=True)
class GrammarLimits:
    """The settings `grammar_max_bytes`, `grammar_compile_timeout_s`, `grammar_cache_size` of the
    gateway and the compute service (each process applies its own)."""

    max_bytes: int = 64 * 1024  # a schema, regex or grammar's text (UTF-8), at most
    compile_timeout_s: float = 5.0  # wall time for one compile (its work is also bounded by fuel)
    cache_size: int = 256  # compiled grammars kept, by content


DEFAULT_LIMITS = GrammarLimits()


@dataclass
class GrammarSettings:
    """The grammar settings the gateway's and the compute service's configs share (same names,
    each process applying its own): what one constraint may cost to compile."""

    grammar_max_bytes: int = DEFAULT_LIMITS.max_bytes  # a schema, regex or grammar's text, at most
    grammar_compile_timeout_s: float = DEFAULT_LIMITS.compile_timeout_s  # past it: refused (work is fuel-bounded too)
    grammar_cache_size: int = DEFAULT_LIMITS.cache_size  # compiled grammars kept, by content

    @property
    def grammar_limits(self) -> GrammarLimits:
        return GrammarLimits(self.grammar_max_bytes, self.grammar_compile_timeout_s, self.grammar_cache_size)


class GrammarCompiler:
    """Validates constraints and hands out matchers, one compiled grammar per distinct
    constraint (an LRU of `limits.cache_size`): a matcher for a request is a cheap copy of the
    cached one. Thread-safe; the tokenizer (a fraction of a second to build) is built once, on
    first use."""

    def __init__(self, encoding, vocab_size: int, eos_token_id: int, limits: GrammarLimits | None = None) -> None:
        self._encoding, self._vocab_size, self._eos = encoding, vocab_size, eos_token_id
        self._tokenizer = None
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self.limits = limits or DEFAULT_LIMITS
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from llguidance.tiktoken import lltokenizer_from_encoding  # noqa: PLC0415

                self._tokenizer = lltokenizer_from_encoding(
                    self._encoding, n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._tokenizer

    def matcher(self, constraint: Constraint):
        """A fresh matcher at the start of the output (FieldError if the constraint is invalid or
        too complex for the limits). Blocking: call it off any event loop or engine thread."""
        with self._lock:
            template = self._cache.get(constraint)
            if template is not None:
                self._cache.move_to_end(constraint)
                return template.deep_copy()
        template = self._compile(constraint)
        with self._lock:
            self._cache[constraint] = template
            while len(self._cache) > self.limits.cache_size:
                self._cache.popitem(last=False)
        return template.deep_copy()

    def _compile(self, constraint: Constraint):
        import llguidance  # noqa: PLC0415

        constraint.check()
        size = len(constraint.spec.encode("utf-8", "replace"))
        if size > self.limits.max_bytes:
            raise FieldError(
                FIELD,
                f"{FIELD}: the {constraint.kind} is {size} bytes; at most {self.limits.max_bytes} (grammar_max_bytes)",
            )
        grammar = grammar_text(constraint)
        limits = llguidance.LLParserLimits(verbose_errors=False)
        try:  # the constructor validates (an invalid grammar is a matcher in its error state)
            matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=limits)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise FieldError(FIELD, f"{FIELD}: invalid {constraint.kind}: {str(exc)[:300]}") from None
        if matcher.is_error():
            raise FieldError(FIELD, f"{FIELD}: invalid {constraint.kind}: {matcher.get_error()[:300]}")
        return matcher


@lru_cache(maxsize=4)
def get_grammar_compiler(vocab_size: int, limits: GrammarLimits | None = None) -> GrammarCompiler:
    """The process's compiler for a model with `vocab_size` logits (ids past the tokenizer's, a
    padded vocabulary, are never allowed) under `limits`."""
    tokenizer = get_tokenizer()
    return GrammarCompiler(tokenizer.encoding, vocab_size, tokenizer.eot_token_id, limits or DEFAULT_LIMITS)


async def compile_off_loop(compile_: Callable[[], T], limits: GrammarLimits) -> T:
    """Run a compile on a worker thread, refused past `limits.compile_timeout_s` (the thread
    finishes in the background, bounded by llguidance's fuel; its grammar is then cached)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(compile_), limits.compile_timeout_s)
    except TimeoutError:
        raise FieldError(
            FIELD, f"{FIELD}: compiling it took over {limits.compile_timeout_s:g} s (grammar_compile_timeout_s)"
        ) from None
