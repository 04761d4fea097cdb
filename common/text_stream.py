"""Text deltas for a stream of token ids, as a client reads them."""

from __future__ import annotations

from common.tokenizer import Tokenizer


class IncrementalText:
    """Text deltas for streamed tokens: a split UTF-8 character, or what could still turn into a
    stop string, is held back until it is settled."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent += len(delta)
        return delta

    def finish(self, final_text: str) -> str:
        """What is left of the final (stop-truncated) text."""
        rest = final_text[self.sent :]
        self.sent = len(final_text)
        return rest
