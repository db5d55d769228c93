"""Ingest: JSON Lines files of logged conversations -> validated, PII-scrubbed rows in the interaction store.

    ingest_files(store, settings, [Path("logs.jsonl")], fmt="auto") -> IngestSummary

What it promises:
- Streaming: a file is read line by line in binary (each line decoded on its own, so one line of invalid
  UTF-8 is one quarantined line), rows go to the store in batches of BATCH_ROWS, memory stays flat.
- Nothing is lost on interruption: counts are reported only after their batch committed, and re-ingesting
  the same file adds nothing (insert_ignore skips known ids and content hashes).
- Bad input never stops a file: a malformed line, a wrong type, an unknown role, an oversized message or
  invalid UTF-8 is written to the quarantine file (settings.quarantine_path) with file, line and reason, and
  counted. A missing file is reported and the other files are still ingested.
- PII is scrubbed (flywheel.data.pii) from message content, tool-call arguments and complaint text before
  the content hash is computed and before anything is stored, quarantine included.

Why a hand-written validator instead of `Interaction.model_validate` per line: at 200k lines it costs
more than the rest of the path together; `_build_row` checks exactly what the record would, and tests
read every stored row back through the pydantic records.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import Field
from sqlalchemy.exc import DataError, IntegrityError

from flywheel.data.formats import FORMATS, MappingError, detect, to_flat
from flywheel.data.pii import Scrubber, may_contain_pii
from flywheel.errors import UserInputError
from flywheel.records import Record, interaction_hash, utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.store.interactions import insert_ignore

BATCH_ROWS = 2000
RAW_PREFIX_CHARS = 2000  # how much of a bad line the quarantine keeps
ROLES = frozenset(("system", "user", "assistant", "tool"))
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
MAX_ID_CHARS = 200  # the widths of the store's columns: PostgreSQL refuses longer values
MAX_TIER_CHARS = 100


class FileSummary(Record):
    path: str
    read: int = 0  # non-blank lines (or JSON array items)
    stored: int = 0  # new rows, committed
    duplicates: int = 0  # rows the store already held (same id or same content)
    quarantined: int = 0
    error: str | None = None  # the file could not be read at all
    formats: dict[str, int] = Field(default_factory=dict)  # lines per detected format
    reasons: dict[str, int] = Field(default_factory=dict)  # quarantined lines per reason kind
    pii: dict[str, int] = Field(default_factory=dict)  # placeholders written, per PII kind


class IngestSummary(Record):
    files: list[FileSummary] = []
    quarantine_path: str = ""

    @property
    def stored(self) -> int:
        return sum(f.stored for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    @property
    def failed_files(self) -> int:
        return sum(1 for f in self.files if f.error)

    @property
    def clean(self) -> bool:
        """True when every line of every file was stored or a duplicate."""
        return self.quarantined == 0 and self.failed_files == 0


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
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    if not isinstance(value, str):
        raise BadLine("wrong_type", f"timestamp must be an ISO 8601 string or epoch seconds, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadLine("bad_timestamp", f"timestamp {value[:40]!r} is not ISO 8601") from None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


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


def _count(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise BadLine("wrong_type", f"{where} must be a whole number >= 0, got {value!r}"[:120])


def _number(value: Any, where: str) -> Any:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise BadLine("wrong_type", f"{where} must be a number, got {type(value).__name__}")


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
            raise BadLine("oversized", f"{at}.function.arguments is {len(arguments)} characters, over policies.max_message_chars ({max_chars})")
        call_id = _ident(call.get("id"), f"{at}.id")
        if not call_id:
            raise BadLine("missing_field", f"{at}.id is missing")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": scrubber.json_text(arguments)}})
    return calls


def _messages(value: Any, scrubber: Scrubber, max_chars: int) -> list[dict[str, Any]]:
    """Validated messages, each shaped exactly as `Message.model_dump(exclude_none=True)`. Content is not
    scrubbed here: `build_row` scrubs the whole conversation in one scan."""
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
                raise BadLine("oversized", f"messages[{i}].content is {len(content)} characters, over policies.max_message_chars ({max_chars})")
            row["content"] = content
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


def _pseudonym(user_id: str | None) -> str | None:
    """A user id that is itself PII (an e-mail, a phone number) becomes a stable pseudonym: the same person
    still groups together, the address is not stored."""
    if user_id is None or not may_contain_pii(user_id):
        return user_id
    if Scrubber().text(user_id) == user_id:
        return user_id
    return "user-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]


def build_row(flat: dict[str, Any], scrubber: Scrubber, max_chars: int, source: str, now: datetime) -> dict[str, Any]:
    """One flat record (flywheel's own shape) -> a row for `store.interactions.insert_ignore`.

    Raises BadLine naming the field when something is missing, of the wrong type or too large."""
    messages = _messages(flat.get("messages"), scrubber, max_chars)
    complaint = _complaint(flat.get("complaint"))
    # PII: the whole conversation and the complaint in one scan, before the hash and before storage.
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
        "prompt_tokens": _number(flat.get("prompt_tokens"), "prompt_tokens"),
        "completion_tokens": _number(flat.get("completion_tokens"), "completion_tokens"),
        "ingested_at": now,
    }


# --- reading files ------------------------------------------------------------------------------------------


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115 - closed by caller


def _read_lines(handle: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) for each line; None for a line over `max_bytes`, which is skipped without
    being held in memory."""
    number = 0
    while True:
        raw = handle.readline(max_bytes)
        if not raw:
            return
        number += 1
        if len(raw) >= max_bytes and not raw.endswith(b"\n"):
            while True:  # drain the rest of the oversized line
                rest = handle.readline(max_bytes)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        yield number, raw


def _read_json_array(handle: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(item number, raw JSON text of the item) for a file holding one JSON array, read in chunks so that
    memory stays flat. An item that cannot be delimited ends the file (a BadLine for that item)."""
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buffer = ""
    eof = False
    number = 0
    pos = 0

    def fill() -> bool:
        nonlocal buffer, pos, eof
        chunk = handle.read(1 << 20)
        if not chunk:
            eof = True
            buffer = buffer[pos:] + text_decoder.decode(b"", final=True)
        else:
            try:
                buffer = buffer[pos:] + text_decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise BadLine("invalid_utf8", f"invalid UTF-8 in JSON array after item {number}: {exc.reason}") from None
        pos = 0
        return not eof

    fill()
    while pos < len(buffer) and buffer[pos].isspace():
        pos += 1
    if not buffer[pos:pos + 1] == "[":
        raise BadLine("malformed_json", "the file starts with neither a JSON object per line nor a JSON array")
    pos += 1
    while True:
        while True:  # skip whitespace and commas between items
            while pos < len(buffer) and (buffer[pos].isspace() or buffer[pos] == ","):
                pos += 1
            if pos < len(buffer) or eof or not fill():
                break
        if pos >= len(buffer) or buffer[pos] == "]":
            return
        number += 1
        while True:
            try:
                item, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as exc:
                if not eof and len(buffer) - pos < max_bytes:
                    fill()
                    continue
                raise BadLine("malformed_json", f"item {number}: {exc.msg} (the rest of the array cannot be read)") from None
            break
        yield number, buffer[pos:end].encode("utf-8")
        pos = end


def _looks_like_array(path: Path) -> bool:
    with _open(path) as handle:
        head = handle.read(64).lstrip()
    return head.startswith(b"[")


# --- the driver ---------------------------------------------------------------------------------------------


class _Quarantine:
    """Appends bad lines to the quarantine file (JSON Lines: file, line, reason, raw, at). The raw prefix
    is PII-scrubbed too: quarantine is storage."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: IO[str] | None = None

    def write(self, file: str, line: int, kind: str, reason: str, raw: bytes | str | None) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if isinstance(raw, bytes):
            raw = raw[: RAW_PREFIX_CHARS * 4].decode("utf-8", errors="backslashreplace")
        text = (raw or "")[:RAW_PREFIX_CHARS].rstrip("\n")
        record = {"file": file, "line": line, "kind": kind, "reason": reason, "raw": Scrubber().text(text), "at": utcnow().isoformat()}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


Progress = Callable[[FileSummary], None]


def ingest_files(
    store: Store,
    settings: Settings,
    paths: list[Path],
    fmt: str = "auto",
    on_progress: Progress | None = None,
    batch_rows: int = BATCH_ROWS,
) -> IngestSummary:
    """Ingest each file; return what happened to every line. `on_progress` is called after each committed
    batch with the file's counts so far (everything it reports is durable)."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = IngestSummary(quarantine_path=str(settings.quarantine_path))
    quarantine = _Quarantine(settings.quarantine_path)
    try:
        for path in paths:
            counts = FileSummary(path=str(path))
            summary.files.append(counts)
            if not path.exists():
                counts.error = "file not found"
                continue
            if path.is_dir():
                counts.error = "is a folder, not a file"
                continue
            try:
                _ingest_one(store, settings, path, fmt, counts, quarantine, on_progress, batch_rows)
            except OSError as exc:
                counts.error = f"cannot read: {exc.strerror or exc}"
    finally:
        quarantine.close()
    return summary


def _ingest_one(
    store: Store,
    settings: Settings,
    path: Path,
    fmt: str,
    counts: FileSummary,
    quarantine: _Quarantine,
    on_progress: Progress | None,
    batch_rows: int,
) -> None:
    max_chars = settings.policies.max_message_chars
    # A line holds a few messages; anything far beyond that is refused before it is parsed.
    max_line_bytes = max(1 << 20, 64 * max_chars)
    name = str(path)
    source_name = path.name[-300:]
    scrubber = Scrubber()
    formats: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    batch: list[dict[str, Any]] = []
    lines_of_batch: list[int] = []
    loads = orjson.loads
    detect_each = fmt == "auto"
    now = utcnow()

    def bad(line: int, kind: str, reason: str, raw: bytes | str | None) -> None:
        counts.quarantined += 1
        reasons[kind] += 1
        quarantine.write(name, line, kind, reason, raw)

    def commit() -> None:
        nonlocal now
        if batch:
            stored, refused = _store_batch(store, batch, lines_of_batch, bad)
            counts.stored += stored
            counts.duplicates += len(batch) - stored - refused
            batch.clear()
            lines_of_batch.clear()
        quarantine.flush()
        counts.formats = dict(formats)
        counts.reasons = dict(reasons)
        counts.pii = dict(scrubber.counts)
        now = utcnow()
        if on_progress is not None:
            on_progress(counts.model_copy())

    with _open(path) as handle:
        reader = _read_json_array(handle, max_line_bytes) if _looks_like_array(path) else _read_lines(handle, max_line_bytes)
        try:
            for line_no, raw in reader:
                if raw is None:
                    counts.read += 1
                    bad(line_no, "oversized", f"line is over {max_line_bytes} bytes", None)
                    continue
                if not raw.strip():
                    continue
                counts.read += 1
                try:
                    obj = loads(raw)
                except orjson.JSONDecodeError as exc:
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError as uexc:
                        bad(line_no, "invalid_utf8", f"invalid UTF-8 at byte {uexc.start}", raw)
                    else:
                        bad(line_no, "malformed_json", f"not valid JSON: {exc}"[:200], raw)
                    continue
                if b"\\u0000" in raw:  # JSON's escape for NUL: PostgreSQL cannot store it, and PII scans join on it
                    bad(line_no, "nul_character", "the line contains a NUL character (\\u0000)", raw)
                    continue
                if type(obj) is not dict:
                    bad(line_no, "wrong_type", f"expected a JSON object, got a JSON {type(obj).__name__}", raw)
                    continue
                try:
                    kind = detect(obj) if detect_each else fmt
                    flat = to_flat(obj, kind)
                    row = build_row(flat, scrubber, max_chars, f"{source_name}:{line_no}" if kind == "openai" else f"{kind}:{source_name}:{line_no}", now)
                except BadLine as exc:
                    bad(line_no, exc.kind, str(exc), raw)
                    continue
                except MappingError as exc:
                    bad(line_no, "unmappable", str(exc), raw)
                    continue
                except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
                    # an export record of an unexpected shape: quarantined with what went wrong, not a crash
                    bad(line_no, "unmappable", f"cannot read this {fmt if fmt != 'auto' else 'record'}: {type(exc).__name__}: {exc}"[:200], raw)
                    continue
                formats[kind] += 1
                batch.append(row)
                lines_of_batch.append(line_no)
                if len(batch) >= batch_rows:
                    commit()
        except BadLine as exc:  # a JSON array that cannot be read on
            bad(0, exc.kind, str(exc), None)
        commit()


def _store_batch(store: Store, rows: list[dict[str, Any]], lines: list[int], bad: Callable[..., None]) -> tuple[int, int]:
    """Insert one batch in one transaction; returns (rows that were new, rows refused). If the database refuses the batch
    for a data reason (a value PostgreSQL will not hold), rows go one by one and the refused ones are
    quarantined, so one odd row does not cost its 1,999 neighbours."""
    try:
        with store.begin() as conn:
            return insert_ignore(conn, rows), 0
    except (DataError, IntegrityError):
        pass
    stored = refused = 0
    for row, line in zip(rows, lines):
        try:
            with store.begin() as conn:
                stored += insert_ignore(conn, [row])
        except (DataError, IntegrityError) as exc:
            refused += 1
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            bad(line, "store_refused", f"the store refused this row: {reason}"[:200], json.dumps(row["messages"], ensure_ascii=False))
    return stored, refused
