"""Fencing untrusted text inside prompts.

Logged text is untrusted (ARCHITECTURE principle 5). It reaches an LLM only inside fenced blocks whose
tag is a fresh random nonce per request (`untrusted_block`); fence-like runs in the text are altered so
that nothing inside can end a block. The prompt files say the blocks are data, never instructions, and
are split at `USER_MARKER` into the system message (instructions) and the user message (the fenced
material). Used by the judge, the corrector, the verifier and the tools that show logged text to the
supervisor.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from flywheel.records import Message

__all__ = ["USER_MARKER", "clip", "new_nonce", "render_messages", "untrusted_block"]

USER_MARKER = "<!-- user -->"


def new_nonce() -> str:
    return secrets.token_hex(8)


def untrusted_block(name: str, text: str, nonce: str) -> str:
    """`text` fenced as data. Runs of three or more angle brackets inside become look-alike characters
    and the nonce is masked, so the text can neither close this block nor forge another."""
    if len(nonce) < 8:
        raise ValueError("untrusted_block needs a random nonce from new_nonce()")
    safe = text.replace(nonce, "[fence-tag]")
    safe = re.sub(r"<{3,}", lambda m: "‹" * len(m.group()), safe)
    safe = re.sub(r">{3,}", lambda m: "›" * len(m.group()), safe)
    label = re.sub(r"[^a-z0-9_]", "_", name.lower())
    return f"<<<BEGIN UNTRUSTED {nonce} {label}>>>\n{safe}\n<<<END UNTRUSTED {nonce} {label}>>>"


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how many were left off."""
    return text if len(text) <= limit else text[:limit] + f" …[{len(text) - limit} more characters]"


def render_messages(messages: Sequence[Message], max_chars: int) -> str:
    lines = []
    for number, message in enumerate(messages, start=1):
        head = f"[{number}] {message.role}" + (f" ({message.name})" if message.name else "")
        lines.append(head + ":")
        if message.content:
            lines.append(clip(message.content, max_chars))
        for call in message.tool_calls or []:
            lines.append(f"tool call {call.function.name} {clip(call.function.arguments, max_chars)}")
    return "\n".join(lines) or "(none)"
