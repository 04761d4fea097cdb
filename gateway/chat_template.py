"""The chat template: OpenAI chat messages as the plain text a base model continues.

The default model is a base model trained on Shakespeare's plays, which has no chat format of its
own, so the template is the play's own: every turn is a speech, a SPEAKER line then the text, and
a blank line ends a speech. The model is then asked for the next speech:

    <system content>                      (if any: a preamble, as a scene direction)

    USER:                                 (the message's `name`, upper-cased, if it has one)
    <user content>

    ASSISTANT:                            (the reply's speaker: see `reply_speaker`)
    <the model's reply>

A blank line ("\n\n") ends the reply: chat requests stop there (END_OF_TURN) besides their own
stop strings. So `{"role": "user", "name": "Romeo", ...}` with an assistant named "Juliet" reads
as the play does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.sampling_params import FieldError

END_OF_TURN = "\n\n"
ROLES = ("system", "developer", "user", "assistant")
NAME = re.compile(r"[^\n\r:]{1,64}")  # a speaker name cannot end its line or fake another speaker


@dataclass
class ChatMessage:
    role: str
    content: str
    name: str = ""


def speaker(message: ChatMessage) -> str:
    return (message.name or message.role).strip().upper()


def reply_speaker(messages: list[ChatMessage]) -> str:
    """The speaker of the reply: the name of the last assistant message that has one (so a
    conversation keeps its cast), else ASSISTANT."""
    named = [m.name for m in messages if m.role == "assistant" and m.name]
    return named[-1].strip().upper() if named else "ASSISTANT"


def render(messages: list[ChatMessage]) -> str:
    """The prompt text for `messages`, ending where the reply's text begins. FieldError
    ("messages") for an empty conversation or an unknown role."""
    if not messages:
        raise FieldError("messages", "messages must hold at least one message")
    parts = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise FieldError("messages", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.role!r}")
        if message.name and not NAME.fullmatch(message.name):
            raise FieldError(
                "messages",
                f"messages[{i}].name must be 1-64 characters without a newline or ':' (it becomes a speaker line)",
            )
        if message.role in ("system", "developer"):
            parts.append(message.content.strip() + END_OF_TURN)
        else:
            parts.append(f"{speaker(message)}:\n{message.content.strip()}{END_OF_TURN}")
    return "".join(parts) + f"{reply_speaker(messages)}:\n"
