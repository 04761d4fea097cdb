"""GPT-2's BPE through tiktoken, fully offline.

The ranks come from `assets/gpt2.tiktoken` shipped with the project (the MIT-licensed asset of
the openai-whisper sdist; see assets/LICENSE-gpt2-tiktoken.txt). `tiktoken.get_encoding("gpt2")`
is not used because it fetches files over the network when its cache is cold.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

import tiktoken

RANKS_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
EOT_TOKEN = "<|endoftext|>"
EOT_TOKEN_ID = 50256
# GPT-2's pre-tokenizer regex (the same pattern tiktoken's own "gpt2" encoding uses).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def get_tokenizer() -> "Tokenizer":
    return Tokenizer()


class Tokenizer:
    def __init__(self, ranks_file: Path = RANKS_FILE) -> None:
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=_load_ranks(ranks_file),
            special_tokens={EOT_TOKEN: EOT_TOKEN_ID},
        )
        self.eot_token_id = EOT_TOKEN_ID
        self.vocab_size = self._enc.n_vocab  # 50257
        # The longest token's bytes (128 for GPT-2): a text of more than context x this many bytes
        # cannot fit a context, whatever it tokenizes to (checked before tokenizing).
        self.max_token_bytes = max(len(token) for token in self._enc.token_byte_values())

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding itself (the grammar engine builds its own tokenizer from it)."""
        return self._enc

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; "<|endoftext|>" in user text is encoded as text, not as EOT."""
        return self._enc.encode_ordinary(text)

    def decode(self, token_ids: list[int]) -> str:
        return self._enc.decode(token_ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes (a token may hold part of a UTF-8 character: logprobs report both)."""
        return self._enc.decode_single_token_bytes(token_id)
