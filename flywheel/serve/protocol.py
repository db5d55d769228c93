"""The OpenAI wire format the gateway speaks: request validation, error bodies, completion and chunk shapes.

Errors always have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so that the official
client raises its usual exception types (401 AuthenticationError, 404 NotFoundError, 400 BadRequestError).
A request is validated against the fields the gateway itself reads; every other field passes through to
the proxy's upstream untouched (extra="allow"), so a client using a parameter flywheel does not know about
still works against vLLM.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

INTERACTION_HEADER = "x-flywheel-interaction-id"
VERSION_HEADER = "x-flywheel-model-version"
USER_HEADER = "x-flywheel-user"  # the end user, when the request's `user` field is not set
TIER_HEADER = "x-flywheel-user-tier"  # e.g. "enterprise": the capture rules weigh high-value users
INTENT_HEADER = "x-flywheel-intent"  # the caller's label of what the user asked for, when it has one
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An answer in OpenAI's error shape. Raised anywhere on the request path; the app turns it into a response."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status, media_type="application/json", headers=self.headers)


def not_found_model(model: str, why: str = "") -> ApiError:
    message = f"The model `{model}` does not exist" + (f": {why}" if why else "") + " (GET /v1/models lists what this gateway serves)"
    return ApiError(404, message, param="model", code="model_not_found")


# --- requests ------------------------------------------------------------------------------------------------


class _In(BaseModel):
    # strict: "1" is not a number and 1 is not a string, as OpenAI's own validation answers
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionIn(_In):
    name: str
    arguments: str


class ToolCallIn(_In):
    id: str
    type: Literal["function"] = "function"
    function: FunctionIn


class MessageIn(_In):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class StreamOptions(_In):
    include_usage: bool = False


class ChatRequest(_In):
    model: str = Field(min_length=1, max_length=200)
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    user: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw.strip():
        raise ApiError(400, "The request body is empty; expected a JSON object", code="invalid_json")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"The request body must be a JSON object, got a JSON {type(payload).__name__}", code="invalid_json")
    return payload


def validate(model: type[BaseModel], payload: dict[str, Any]) -> Any:
    """`model.model_validate(payload)`, with the first problem as a 400 naming the field (OpenAI's `param`)."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _dotted(err["loc"])
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter") from None
        got = err.get("input")
        shown = type(got).__name__ if isinstance(got, (dict, list)) else repr(got)[:80]
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']} (got {shown})", param=param, code="invalid_value") from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[dict[str,any]]", "function-after[...]") or "[" in str(part):
            continue  # pydantic names the union member it tried; OpenAI's param is the field only
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))


# --- responses -----------------------------------------------------------------------------------------------


def new_interaction_id() -> str:
    """The id of one served interaction: the completion id the client sees and the stored Interaction's id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, message: dict[str, Any], finish_reason: str, token_usage: dict[str, int]) -> dict[str, Any]:
    """A `chat.completion` object (the app sets `id` and `model` to the interaction and the serving version)."""
    return {
        "id": "",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": token_usage,
        "system_fingerprint": None,
    }


def chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None, created: int | None = None) -> dict[str, Any]:
    return {
        "id": "",
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(model: str, token_usage: dict[str, int], created: int | None = None) -> dict[str, Any]:
    """The last chunk of a stream when the client asked for `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": "",
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": [],
        "usage": token_usage,
    }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamAccumulator:
    """Rebuilds the assistant message (content, tool calls), finish reason and usage from a stream's chunks,
    for capture. Only the first choice is kept: an interaction is one answer."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def add(self, chunk_obj: dict[str, Any]) -> None:
        if chunk_obj.get("usage"):
            self.usage = chunk_obj["usage"]
        for choice in chunk_obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = self.tool_calls.setdefault(
                    call.get("index", 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    slot["function"]["name"] += function["name"]
                if function.get("arguments"):
                    slot["function"]["arguments"] += function["arguments"]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) if self.content or not self.tool_calls else None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message

    def tokens(self) -> tuple[int | None, int | None]:
        if not self.usage:
            return None, None
        return self.usage.get("prompt_tokens"), self.usage.get("completion_tokens")
