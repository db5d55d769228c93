"""One logged record in flywheel's own flat shape -> a validated, PII-scrubbed row for the interaction store.

    build_row(flat, scrubber, max_chars, source, now) -> dict   (raises BadLine naming the field)

Used by ingest (flywheel.data.ingest) and by the gateway's capture (flywheel.serve.capture), so that a
logged file and live traffic are validated and scrubbed the same way.

Why a hand-written validator instead of `Interaction.model_validate` per line: at 200,000 lines it cost
more than the rest of the ingest path together. `build_row` checks what the record checks (types, roles,
signal values, column widths) and shapes each message exactly as `Message.model_dump(exclude_none=True)`;
tests/test_ingest.py reads every stored row back through the pydantic records.
"""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import orjson

from flywheel.data.pii import Scrubber, find_pii
from flywheel.records import interaction_hash

ROLES = frozenset(("system", "user", "assistant", "tool"))
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
MAX_ID_CHARS = 200  # the widths of the store's columns: PostgreSQL refuses longer values
MAX_TIER_CHARS = 100


class BadLine(ValueError):
    """One input line that cannot be stored. `kind` groups reasons in the summary."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


# --- the per-line path: flat dict -> validated, scrubbed store row ------------------------------------------


def _text(value: Any, where: str, limit: int | None = None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadLine("wrong_type", f"{where} must be a string, got {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise BadLine("too_long", f"{where} is {len(value)} characters, over the {limit} the store holds")
    return value


def _ident(value: Any, where: str) -> str | None:
    """Ids and user ids may be logged as numbers; they are stored as text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = _text(value, where, MAX_ID_CHARS)
    return value or None


def _timestamp(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000.0 if value > 1e11 else value  # epoch milliseconds are common in logs
        try:
            return datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise BadLine("bad_timestamp", f"timestamp {value!r} is out of range") from None
    if not isinstance(value, str):
        raise BadLine("wrong_type", f"timestamp must be an ISO 8601 string or epoch seconds, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadLine("bad_timestamp", f"timestamp {value[:40]!r} is not ISO 8601") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _feedback(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("up", "thumbs_up", "positive", "+1"):
            return "up"
        if word in ("down", "thumbs_down", "negative", "-1"):
            return "down"
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value in (1, -1):
        return "up" if value == 1 else "down"
    raise BadLine("wrong_value", f"feedback must be 'up' or 'down', got {value!r}"[:120])


def _qa_verdict(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().capitalize() in ("Accept", "Risk", "Reject"):
        return value.strip().capitalize()
    raise BadLine("wrong_value", f"qa_verdict must be Accept, Risk or Reject, got {value!r}"[:120])


def _flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadLine("wrong_type", f"{where} must be true or false, got {value!r}"[:120])


MAX_COUNT = 2**31 - 1  # an INTEGER column on PostgreSQL


def _count(value: Any, where: str, default: int | None = 0) -> int | None:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
        return value
    raise BadLine("wrong_type", f"{where} must be a whole number from 0 to {MAX_COUNT}, got {value!r}"[:120])


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300:
        return float(value)
    raise BadLine("wrong_type", f"{where} must be a number, got {value!r}"[:120])


def _complaint(value: Any) -> str | None:
    if value is None or value is False or value == "":
        return None
    if value is True:
        return "complaint"  # a bare flag: the capture rule needs a non-empty text
    return _text(value, "complaint")


def _tool_calls(value: Any, where: str, scrubber: Scrubber, max_chars: int) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadLine("wrong_type", f"{where}.tool_calls must be a list, got {type(value).__name__}")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise BadLine("wrong_type", f"{at} must be an object with a 'function' object")
        if call.get("type", "function") != "function":
            raise BadLine("wrong_value", f"{at}.type must be 'function', got {call.get('type')!r}"[:120])
        function = call["function"]
        name = _text(function.get("name"), f"{at}.function.name")
        if not name:
            raise BadLine("missing_field", f"{at}.function.name is missing")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = "{}"
        elif isinstance(arguments, (dict, list)):  # some loggers keep the parsed object
            arguments = json.dumps(arguments, ensure_ascii=False)
        elif not isinstance(arguments, str):
            raise BadLine("wrong_type", f"{at}.function.arguments must be JSON text, got {type(arguments).__name__}")
        if len(arguments) > max_chars:
            raise BadLine(
                "oversized", f"{at}.function.arguments is {len(arguments)} characters, over policies.max_message_chars ({max_chars})"
            )
        call_id = _ident(call.get("id"), f"{at}.id")
        if not call_id:
            raise BadLine("missing_field", f"{at}.id is missing")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": scrubber.json_text(arguments)}})
    return calls


def _messages(value: Any, scrubber: Scrubber, max_chars: int) -> list[dict[str, Any]]:
    """Validated messages, each shaped exactly as `Message.model_dump(exclude_none=True)`. Content is not
    scrubbed here: `build_row` scrubs all texts of the conversation together."""
    if type(value) is not list:
        raise BadLine("wrong_type", f"messages must be a list, got {type(value).__name__}")
    if not value:
        raise BadLine("missing_field", "messages is empty")
    out = []
    for i, msg in enumerate(value):
        if type(msg) is not dict:
            raise BadLine("wrong_type", f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            role = ROLE_ALIASES.get(role) if isinstance(role, str) else None
            if role is None:
                raise BadLine("unknown_role", f"messages[{i}].role {msg.get('role')!r} is not one of system, user, assistant, tool"[:160])
        row: dict[str, Any] = {"role": role}
        content = msg.get("content")
        if content is not None:
            if type(content) is not str:
                if not isinstance(content, list):
                    raise BadLine("wrong_type", f"messages[{i}].content must be a string, got {type(content).__name__}")
                # content parts: keep the text ones
                content = "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            if len(content) > max_chars:
                raise BadLine(
                    "oversized", f"messages[{i}].content is {len(content)} characters, over policies.max_message_chars ({max_chars})"
                )
            if "\x00" in content:
                raise BadLine("nul_character", f"messages[{i}].content contains a NUL character, which PostgreSQL cannot store")
            row["content"] = content
        if len(msg) > 2 or content is None:  # anything besides role and content
            calls = msg.get("tool_calls")
            if calls:
                row["tool_calls"] = _tool_calls(calls, f"messages[{i}]", scrubber, max_chars)
            for key in ("tool_call_id", "name"):
                item = msg.get(key)
                if item is not None:
                    row[key] = _text(item, f"messages[{i}].{key}", MAX_ID_CHARS)
        out.append(row)
    return out


def content_hash(messages: list[dict[str, Any]], user_id: str | None, timestamp: str) -> str:
    """Exactly `flywheel.records.interaction_hash(messages, user_id, timestamp)`, computed with orjson when
    that gives the same bytes: for dicts, lists, strings and None, orjson with sorted keys writes what
    json.dumps(sort_keys=True, separators=(",", ":")) writes as long as the text is ASCII without DEL
    (json.dumps escapes those, orjson does not). Anything else takes the reference function.
    tests/test_ingest.py checks the two agree on every ASCII character and on non-ASCII text."""
    blob = orjson.dumps({"m": messages, "u": user_id, "t": timestamp}, option=orjson.OPT_SORT_KEYS)
    if blob.isascii() and b"\x7f" not in blob:
        return hashlib.sha256(blob).hexdigest()[:32]
    return interaction_hash(messages, user_id, timestamp)


@functools.lru_cache(maxsize=65536)
def _pseudonym(user_id: str | None) -> str | None:
    """A user id that is itself PII (an e-mail, a phone number) becomes a stable pseudonym: the same person
    still groups together, the address is not stored. Cached: the same users come back on many lines."""
    if user_id is None or not find_pii(user_id):
        return user_id
    return "user-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def build_row(flat: dict[str, Any], scrubber: Scrubber, max_chars: int, source: str, now: datetime) -> dict[str, Any]:
    """One flat record (flywheel's own shape) -> a row for `store.interactions.insert_ignore`.

    Raises BadLine naming the field when something is missing, of the wrong type or too large."""
    messages = _messages(flat.get("messages"), scrubber, max_chars)
    complaint = _complaint(flat.get("complaint"))
    # PII: every message and the complaint, before the hash and before storage.
    texts = [m["content"] for m in messages if m.get("content")]
    if complaint:
        texts.append(complaint)
    if texts:
        cleaned = scrubber.texts(texts)
        if cleaned is not texts:
            it = iter(cleaned)
            for m in messages:
                if m.get("content"):
                    m["content"] = next(it)
            if complaint:
                complaint = next(it)
    timestamp = _timestamp(flat.get("timestamp"))
    user_id = _pseudonym(_ident(flat.get("user_id"), "user_id"))
    # Without a timestamp the hash leaves time out, so the same conversation logged twice still counts once.
    digest = content_hash(messages, user_id, timestamp.isoformat() if timestamp else "")
    intent = flat.get("intent")
    if intent is None:
        intent = flat.get("task")
    return {
        "id": _ident(flat.get("id"), "id") or digest,
        "content_hash": digest,
        "timestamp": timestamp or now,
        "model_version": _text(flat.get("model_version"), "model_version", MAX_ID_CHARS) or "unknown",
        "intent": _text(intent, "intent", MAX_ID_CHARS) or None,
        "user_id": user_id,
        "user_tier": _text(flat.get("user_tier"), "user_tier", MAX_TIER_CHARS) or None,
        "messages": messages,
        "feedback": _feedback(flat.get("feedback")),
        "escalated_to_human": _flag(flat.get("escalated_to_human"), "escalated_to_human"),
        "followups": _count(flat.get("followups"), "followups"),
        "qa_verdict": _qa_verdict(flat.get("qa_verdict")),
        "complaint": complaint,
        "source": source,
        "latency_ms": _number(flat.get("latency_ms"), "latency_ms"),
        "prompt_tokens": _count(flat.get("prompt_tokens"), "prompt_tokens", None),
        "completion_tokens": _count(flat.get("completion_tokens"), "completion_tokens", None),
        "ingested_at": now,
    }
