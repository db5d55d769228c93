"""Typed records that travel between stages.

A stage is a function over these records; the store reads and writes them at the edges. Each record
carries its provenance: the interaction it came from, the rule that captured it, the judge or generator
that produced it and the prompt version it used.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant", "tool"]
Feedback = Literal["up", "down"]
QAVerdict = Literal["Accept", "Risk", "Reject"]
Acceptance = Literal["Accept", "Risk", "Reject"]
Severity = Literal["low", "medium", "high", "critical"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short content hash of any JSON-serialisable object: the key of idempotent effects."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- interactions -------------------------------------------------------------------------------------


class ToolCallFunction(Record):
    name: str
    arguments: str  # JSON text, as the OpenAI format carries it


class ToolCall(Record):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(Record):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Signals(Record):
    """What production tells us about an answer. The capture rules read these."""

    feedback: Feedback | None = None
    escalated_to_human: bool = False
    followups: int = Field(0, ge=0)
    qa_verdict: QAVerdict | None = None
    complaint: str | None = None
    user_tier: str | None = None


class Interaction(Record):
    """One logged conversation: the messages, who and which model, and the signals."""

    id: str
    timestamp: datetime
    model_version: str = "unknown"
    intent: str | None = None
    user_id: str | None = None
    messages: list[Message]
    signals: Signals = Signals()
    content_hash: str = ""
    source: str = ""  # "file.jsonl:12", "gateway", "langfuse:..."
    # filled by the gateway
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user" and message.content:
                return message.content
        return ""

    def last_assistant(self) -> Message | None:
        for message in reversed(self.messages):
            if message.role == "assistant":
                return message
        return None

    def prompt_messages(self) -> list[Message]:
        """The conversation up to (not including) the final assistant turn: what a model answers."""
        last = None
        for index, message in enumerate(self.messages):
            if message.role == "assistant":
                last = index
        return self.messages[:last] if last is not None else list(self.messages)


def interaction_hash(messages: list[dict[str, Any]] | list[Message], user_id: str | None, timestamp: str) -> str:
    dumped = [m.model_dump(exclude_none=True) if isinstance(m, Message) else m for m in messages]
    return stable_hash({"m": dumped, "u": user_id, "t": timestamp}, length=32)


# --- failures and their verdicts ------------------------------------------------------------------------


class FailureStatus(StrEnum):
    CAPTURED = "captured"  # caught by a rule, not yet sampled for triage
    SKIPPED = "skipped"  # not taken within the triage budget (may be taken next time)
    DUPLICATE = "duplicate"  # a near-duplicate of another failure: counts in that one's cluster
    TRIAGED = "triaged"  # taken: waiting for the judge
    UNJUDGED = "unjudged"  # the judge could not give a valid verdict; reason kept
    NOT_FAILURE = "not_failure"  # the judge says the answer was fine
    JUDGED = "judged"  # a real failure with a verdict, waiting for a correction
    CORRECTED = "corrected"  # a correction exists but failed verification
    UNCORRECTABLE = "uncorrectable"  # no corrector could write an answer
    VERIFIED = "verified"  # a verified correction exists: usable for training


class SampleTier(StrEnum):
    PROBLEM = "problem"
    CANDIDATE = "candidate_baseline"
    SECONDARY = "secondary_baseline"
    CORE = "core_baseline"


class Failure(Record):
    id: str
    interaction_id: str
    rule: str  # the highest-risk rule that caught it
    rules: list[str] = []  # every rule that matched
    risk: float = 0.0
    first_seen_version: str
    intent: str | None = None
    status: FailureStatus = FailureStatus.CAPTURED
    cluster_id: str | None = None  # the failure that represents its cluster
    cluster_size: int = 1
    tier: SampleTier = SampleTier.PROBLEM
    weight: float = 1.0
    captured_at: datetime = Field(default_factory=utcnow)


class Verdict(Record):
    failure_id: str
    is_failure: bool
    problem_type: str | None = None
    severity: Severity | None = None
    acceptance: Acceptance | None = None
    rationale: str = ""
    judge: str  # "rule", "llm:<model>", "rule+llm:<model>"
    prompt_version: str = ""
    status: Literal["judged", "unjudged"] = "judged"
    reason: str = ""  # why it is unjudged
    created_at: datetime = Field(default_factory=utcnow)


class Verification(Record):
    passed: bool
    reasons: list[str] = []
    verifier: str  # "rule", "rule+llm:<model>"


class Correction(Record):
    failure_id: str
    answer: str
    generator: str  # "kb", "llm:<model>"
    prompt_version: str = ""
    context_ids: list[str] = []
    verification: Verification | None = None
    created_at: datetime = Field(default_factory=utcnow)

    @property
    def verified(self) -> bool:
        return bool(self.verification and self.verification.passed)


class FailureView(Record):
    """A failure with everything known about it: what `flywheel failures show` prints."""

    failure: Failure
    interaction: Interaction
    verdict: Verdict | None = None
    correction: Correction | None = None
    tier_moves: list[dict[str, Any]] = []
    reference: Reference | None = None  # the newest human label, when a person labelled it


# --- references and findings: what the judge compares against and what it finds ---------------------------


class Reference(Record):
    """What a right answer must satisfy, when known: a human label, a test-set row, a verified correction."""

    intent: str | None = None
    answer: str | None = None
    fine: bool = False  # a person said the logged answer was right as it stands
    source: str = ""  # "label:<labeller>", "test_set", "correction"


class Finding(Record):
    """One problem a judge found in one answer."""

    problem_type: str
    severity: Severity
    check: str  # which check found it: "output_schema", "policy:<name>", "tool_call", "intent", "llm"
    detail: str = ""


FailureView.model_rebuild()  # its `reference` field names Reference, defined below it
