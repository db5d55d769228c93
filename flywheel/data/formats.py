"""Export mappers: one logged record in a known shape -> flywheel's own flat shape (an OpenAI chat record).

flywheel's own line (docs/ingest.md) is `{"id", "timestamp", "model_version", "intent", "user_id",
"messages": [...OpenAI chat messages...], "feedback", "escalated_to_human", "followups", "qa_verdict",
"complaint", "user_tier"}`. The metadata and signals may also sit in nested "metadata" / "signals" objects.
Each mapper here returns that flat shape; `flywheel.data.ingest` validates it, scrubs PII and stores it.

Shapes read besides our own:
- a LangSmith run (SDK `Client.list_runs` / REST `runs/query`, one run per JSON object): `id`, `start_time`,
  `end_time`, `inputs.messages` (OpenAI dicts or LangChain messages, serialized or as {"type": "human"}),
  `outputs.generations` / `outputs.messages` / `outputs.choices`, `extra.metadata`, `feedback_stats`,
  `prompt_tokens`, `completion_tokens`.
- a Langfuse trace (public API `GET /api/public/traces`, UI export, blob-storage export of traces):
  `id`, `timestamp`, `input`, `output`, `metadata`, `scores` (score objects or a name->value map),
  `userId` / `user_id`, `release`, `version`, `latency` (seconds).

A mapper raises `MappingError` with a one-line reason when the record lacks what an interaction needs.
"""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("auto", "openai", "langfuse", "langsmith")

# The flat keys flywheel reads; anything else on a line is ignored.
SIGNAL_KEYS = ("feedback", "escalated_to_human", "followups", "qa_verdict", "complaint", "user_tier")
META_KEYS = ("id", "timestamp", "model_version", "intent", "task", "user_id", "latency_ms", "prompt_tokens", "completion_tokens")

_LC_ROLES = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "tool": "tool",
    "developer": "system",
    "HumanMessage": "user",
    "AIMessage": "assistant",
    "SystemMessage": "system",
    "ToolMessage": "tool",
    "HumanMessageChunk": "user",
    "AIMessageChunk": "assistant",
    "user": "user",
    "assistant": "assistant",
}


class MappingError(ValueError):
    """A record in a known export shape that cannot become an interaction; the message says why."""


def detect(obj: dict[str, Any]) -> str:
    """Which shape a parsed line has: openai, langsmith or langfuse."""
    if "messages" in obj:
        return "openai"
    if "run_type" in obj or "inputs" in obj:
        return "langsmith"
    if "input" in obj or "output" in obj:
        return "langfuse"
    raise MappingError(
        "unknown record shape: expected 'messages' (OpenAI chat), 'inputs' (LangSmith run) or 'input'/'output' (Langfuse trace)"
    )


def to_flat(obj: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Map one parsed line of format `fmt` (or "auto") to flywheel's flat shape."""
    if fmt == "auto":
        fmt = detect(obj)
    if fmt == "openai":
        return from_openai(obj)
    if fmt == "langsmith":
        return from_langsmith(obj)
    if fmt == "langfuse":
        return from_langfuse(obj)
    raise MappingError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


# --- flywheel's own shape ---------------------------------------------------------------------------------------


def from_openai(obj: dict[str, Any]) -> dict[str, Any]:
    """Our own line. Nested "metadata" / "signals" objects fill keys the top level does not have."""
    meta = obj.get("metadata")
    signals = obj.get("signals")
    if not isinstance(meta, dict) and not isinstance(signals, dict):
        return obj  # the common case: flat already, no copy
    flat = dict(obj)
    for nested in (meta, signals):
        if isinstance(nested, dict):
            for key in (*META_KEYS, *SIGNAL_KEYS):
                if key in nested and flat.get(key) is None:
                    flat[key] = nested[key]
    return flat


# --- messages in the shapes exporters write -------------------------------------------------------------------


def _text_of(content: Any) -> Any:
    """LangChain and OpenAI allow content as a list of parts; flywheel keeps the text parts, joined."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "output_text", "input_text") and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return content


def _lc_tool_calls(fields: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Tool calls of a LangChain AI message: `tool_calls` [{name, args, id}] or OpenAI-style ones kept in
    `additional_kwargs.tool_calls`."""
    calls = fields.get("tool_calls")
    if calls:
        out = []
        for call in calls:
            if "function" in call:  # already OpenAI-shaped
                out.append(call)
            else:
                out.append(
                    {
                        "id": call.get("id") or "",
                        "type": "function",
                        "function": {"name": call.get("name"), "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)},
                    }
                )
        return out
    extra = fields.get("additional_kwargs") or {}
    return extra.get("tool_calls") or None


def message_from_any(msg: Any) -> dict[str, Any]:
    """One message in OpenAI, LangChain-serialized ({"lc": 1, "id": [..., "HumanMessage"], "kwargs": {...}}),
    LangChain dict ({"type": "human", "content": ...} or {"type": "human", "data": {...}}) or a
    ["role", "text"] tuple shape -> an OpenAI chat message dict. The role is checked later, with the rest."""
    if isinstance(msg, (list, tuple)) and len(msg) == 2 and isinstance(msg[0], str):
        return {"role": _LC_ROLES.get(msg[0], msg[0]), "content": _text_of(msg[1])}
    if not isinstance(msg, dict):
        raise MappingError(f"a message is a {type(msg).__name__}, expected an object")
    if "role" in msg:
        out: dict[str, Any] = dict(msg)
        out["content"] = _text_of(msg.get("content"))
        return out
    if msg.get("lc") == 1 and isinstance(msg.get("kwargs"), dict):
        kind = (msg.get("id") or ["?"])[-1]
        fields = msg["kwargs"]
    elif "type" in msg:
        kind = msg["type"]
        fields = msg["data"] if isinstance(msg.get("data"), dict) else msg
    else:
        raise MappingError("a message has neither 'role' nor a LangChain type")
    role = _LC_ROLES.get(kind, kind)
    out = {"role": role, "content": _text_of(fields.get("content"))}
    calls = _lc_tool_calls(fields) if role == "assistant" else None
    if calls:
        out["tool_calls"] = calls
        if out["content"] == "":
            out["content"] = None
    if fields.get("tool_call_id"):
        out["tool_call_id"] = fields["tool_call_id"]
    if fields.get("name"):
        out["name"] = fields["name"]
    return out


def _messages_from(value: Any, default_role: str) -> list[dict[str, Any]]:
    """Messages from an input or output value of any common shape (list, {"messages"}, {"choices"}, a
    single message, plain text, {"input": "..."} / {"output": "..."})."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        if value and isinstance(value[0], list):  # LangChain batches: [[msg, msg]] -> the first conversation
            value = value[0]
        return [message_from_any(m) for m in value]
    if isinstance(value, dict):
        if "messages" in value:
            return _messages_from(value["messages"], default_role)
        if isinstance(value.get("choices"), list) and value["choices"]:  # an OpenAI response object
            return [message_from_any(value["choices"][0].get("message") or {})]
        if "generations" in value:  # LangChain LLMResult: [[{"text", "message"}]]
            gens = value["generations"]
            first = gens[0][0] if gens and isinstance(gens[0], list) else (gens[0] if gens else None)
            if not first:
                return []
            if first.get("message"):
                return [message_from_any(first["message"])]
            return [{"role": "assistant", "content": first.get("text", "")}]
        if "role" in value or "lc" in value or ("type" in value and "content" in value):
            return [message_from_any(value)]
        for key in ("content", "output", "answer", "text", "input", "question", "query", "prompt"):
            if isinstance(value.get(key), str):
                return [{"role": default_role, "content": value[key]}]
        raise MappingError(f"no messages in {default_role} value with keys {sorted(value)[:8]}")
    raise MappingError(f"no messages in a {type(value).__name__} {default_role} value")


def _conversation(inputs: Any, outputs: Any) -> list[dict[str, Any]]:
    messages = _messages_from(inputs, "user")
    answer = _messages_from(outputs, "assistant")
    # Some exporters repeat the whole conversation in the output; keep only what is new.
    if len(answer) > len(messages) and answer[: len(messages)] == messages:
        answer = answer[len(messages) :]
    messages.extend(answer)
    if not messages:
        raise MappingError("the record has neither input nor output messages")
    return messages


def _signals_from_meta(meta: Any, flat: dict[str, Any]) -> None:
    if isinstance(meta, dict):
        for key in (*SIGNAL_KEYS, "intent", "task", "user_id", "model_version"):
            if meta.get(key) is not None and flat.get(key) is None:
                flat[key] = meta[key]


def _norm_name(name: Any) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


_FEEDBACK_NAMES = {"feedback", "user_feedback", "user_score", "thumbs", "thumbs_up", "helpful", "user_rating", "rating"}
_ESCALATION_NAMES = {"escalated_to_human", "escalated", "escalation", "human_handoff"}


def _apply_score(flat: dict[str, Any], name: str, value: Any, text: Any) -> None:
    """A named score or feedback statistic -> the signal it stands for. Unknown names are ignored."""
    if name in _FEEDBACK_NAMES:
        if isinstance(text, str) and text.strip().lower() in ("up", "down", "thumbs_up", "thumbs_down", "positive", "negative"):
            flat["feedback"] = "up" if text.strip().lower() in ("up", "thumbs_up", "positive") else "down"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat["feedback"] = "up" if value >= 0.5 else "down"  # 1/0 and 1/-1 scales both end up right
        elif isinstance(value, bool):
            flat["feedback"] = "up" if value else "down"
    elif name in _ESCALATION_NAMES:
        flat["escalated_to_human"] = bool(value) if not isinstance(text, str) else text.strip().lower() in ("true", "yes", "1")
    elif name in ("followups", "follow_ups"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat["followups"] = int(round(value))
    elif name in ("qa_verdict", "qa"):
        if isinstance(text, str):
            flat["qa_verdict"] = text
    elif name == "complaint":
        if isinstance(text, str) and text:
            flat["complaint"] = text
        elif value:
            flat["complaint"] = "complaint"


# --- LangSmith ----------------------------------------------------------------------------------------------


def _dict_or_empty(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def from_langsmith(run: dict[str, Any]) -> dict[str, Any]:
    extra = _dict_or_empty(run.get("extra"))
    meta = _dict_or_empty(extra.get("metadata"))
    params = _dict_or_empty(extra.get("invocation_params"))
    flat: dict[str, Any] = {
        "id": run.get("id"),
        "timestamp": run.get("start_time"),
        "messages": _conversation(run.get("inputs"), run.get("outputs")),
        "model_version": meta.get("model_version") or meta.get("ls_model_name") or params.get("model") or params.get("model_name"),
        "prompt_tokens": run.get("prompt_tokens"),
        "completion_tokens": run.get("completion_tokens"),
    }
    _signals_from_meta(meta, flat)
    # feedback_stats: {"user_score": {"n": 2, "avg": 0.0, "values": {...}}, "qa_verdict": {"values": {"Reject": 1}}}
    stats = _dict_or_empty(run.get("feedback_stats"))
    for key, stat in stats.items():
        if not isinstance(stat, dict):
            continue
        values = stat.get("values") if isinstance(stat.get("values"), dict) else {}
        top = max(values, key=lambda v: values[v]) if values else None  # the most frequent category
        _apply_score(flat, _norm_name(key), stat.get("avg"), top)
    return flat


# --- Langfuse -----------------------------------------------------------------------------------------------


def from_langfuse(trace: dict[str, Any]) -> dict[str, Any]:
    meta = trace.get("metadata")
    if isinstance(meta, str):  # CSV-origin exports carry metadata as JSON text
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = {}
    meta = meta if isinstance(meta, dict) else {}
    latency = trace.get("latency")
    flat: dict[str, Any] = {
        "id": trace.get("id"),
        "timestamp": trace.get("timestamp"),
        "messages": _conversation(trace.get("input"), trace.get("output")),
        "user_id": trace.get("userId", trace.get("user_id")),
        "model_version": meta.get("model_version") or trace.get("version") or trace.get("release"),
        "latency_ms": latency * 1000.0 if isinstance(latency, (int, float)) and not isinstance(latency, bool) else None,
    }
    _signals_from_meta(meta, flat)
    scores = trace.get("scores")
    if isinstance(scores, dict):  # a flattened export: {"user-feedback": 1, "qa_verdict": "Reject"}
        for name, value in scores.items():
            _apply_score(flat, _norm_name(name), value if not isinstance(value, str) else None, value if isinstance(value, str) else None)
    elif isinstance(scores, list):  # score objects; the list endpoint gives score ids (strings), skipped
        for score in scores:
            if isinstance(score, dict) and score.get("name"):
                name = _norm_name(score["name"])
                text = score.get("stringValue", score.get("string_value"))
                if text is None and isinstance(score.get("value"), str):  # a categorical value given as text
                    text = score["value"]
                if text is None and name == "complaint":
                    text = score.get("comment")
                _apply_score(flat, name, score.get("value"), text)
    return flat
