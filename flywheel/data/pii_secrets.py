"""Secrets for flywheel.data.pii: API keys and tokens of known shapes, and random-looking values after a key name.

    secret_spans(text) -> [(start, end), ...]

Known shapes: sk-..., sk_live_/rk_live_..., AKIA/ASIA..., ghp_/gho_/ghu_/ghs_/ghr_..., github_pat_...,
xox[abposr]-..., AIza..., JWTs, and the token after "Bearer". A value after key=, token:, "api_key": "..."
counts when the key name ends in a secret word and the value looks random (entropy, character classes).
"""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN = re.compile(
    r"sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe secret / restricted keys
    r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
    r"|ghp_[A-Za-z0-9]{30,}|gho_[A-Za-z0-9]{30,}|ghu_[A-Za-z0-9]{30,}|ghs_[A-Za-z0-9]{30,}|ghr_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs (header.payload.signature)
    # a Bearer token: the token only, the word stays
    r"|Bearer\s+(?P<b1>[A-Za-z0-9._~+/-]{16,}=*)|bearer\s+(?P<b2>[A-Za-z0-9._~+/-]{16,}=*)|BEARER\s+(?P<b3>[A-Za-z0-9._~+/-]{16,}=*)"
)
# A value after key=, token:, "api_key": "...": found from the separator, then the key name is looked for
# just before it, and the value is kept only if it looks random (checked below). The value stops at the next
# ':' or '=' so that "config: API_KEY=..." is tried again from the second separator.
_KEY_VALUE = re.compile(r"[:=][ \t]*[\"']?(?P<value>[^\s\"'`,;<>()\[\]{}:=\x00]{8,})")
# The key names, as the endings of the word just before the separator ("stripe_api_key", "X-Auth-Token").
KEY_SUFFIXES = tuple(
    f"{a}{sep}{b}" if b else a
    for a, b in (
        ("api", "key"),
        ("access", "key"),
        ("secret", "key"),
        ("private", "key"),
        ("client", "secret"),
        ("access", "token"),
        ("auth", "token"),
        ("refresh", "token"),
        ("apikey", ""),
        ("secret", ""),
        ("token", ""),
        ("password", ""),
        ("passwd", ""),
        ("pwd", ""),
        ("credential", ""),
        ("credentials", ""),
        ("auth", ""),
        ("key", ""),
    )
    for sep in ("_", "-", "")
)
_WORDISH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def looks_random(value: str) -> bool:
    """A value after key= counts as a secret when it is long and mixed enough not to be a word."""
    if value.startswith("[") or value.isalpha() and value.islower():
        return False
    classes = sum(
        (
            any(c.islower() for c in value),
            any(c.isupper() for c in value),
            any(c.isdigit() for c in value),
            any(not c.isalnum() for c in value),
        )
    )
    if len(value) >= 16:
        counts = Counter(value)
        entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
        return entropy >= 3.0 and classes >= 2
    return classes >= 3  # short values (passwords): need three character classes, e.g. "Hunter2!"


def may_hold_token(text: str) -> bool:
    """Substring tests (memchr-fast) for the prefixes of the token kinds: most text has none of them."""
    if "-" in text and ("sk-" in text or "xox" in text):
        return True
    if "_" in text and ("sk_" in text or "rk_" in text or "gh" in text or "github" in text):
        return True
    return "AKIA" in text or "ASIA" in text or "AIza" in text or "eyJ" in text or "earer" in text or "EARER" in text


def may_hold_key_value(text: str) -> bool:
    if ":" not in text and "=" not in text:
        return False
    lower = text.lower()
    return (
        "key" in lower
        or "token" in lower
        or "secret" in lower
        or "passw" in lower
        or "pwd" in lower
        or "auth" in lower
        or "credential" in lower
    )


def secret_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) of every token of a known shape and every random-looking value after a key name."""
    found: list[tuple[int, int]] = []
    if may_hold_token(text):
        for m in _TOKEN.finditer(text):
            group = "b1" if m.group("b1") else "b2" if m.group("b2") else "b3" if m.group("b3") else None
            if group is not None:
                found.append((m.start(group), m.end(group)))
                continue
            start, end = m.span()
            if (start and (text[start - 1] in _WORDISH)) or (end < len(text) and text[end] in _WORDISH):
                continue  # part of a longer word: not one of the known token shapes
            found.append((start, end))
    if may_hold_key_value(text):
        for m in _KEY_VALUE.finditer(text):
            before = text[max(0, m.start() - 24) : m.start()].rstrip(" \t\"'").lower()
            if before.endswith(KEY_SUFFIXES) and looks_random(m.group("value")):
                start, end = m.span("value")
                rest = text[end : end + 3]
                padding = len(rest) - len(rest.lstrip("="))  # base64 padding belongs to the value
                if padding and (end + padding == len(text) or text[end + padding] in " \t\n\"',;&"):
                    end += padding
                if not any(start < e and s < end for s, e in found):
                    found.append((start, end))
    return found
