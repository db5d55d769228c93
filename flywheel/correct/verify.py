"""Verifying a correction before anything may train on it.

Two checks, in order:
  1. rules (always): the correction must not repeat the original answer, and the rule judge must find
     nothing wrong with it, checked against the failure's Reference (a human label) when there is one;
  2. with an LLM endpoint, a verifier model (prompts/verifier.md) must prefer the correction to the
     original answer. Its reply is parsed against a schema and re-asked up to `correct.llm_retries`
     times when it does not parse; a verifier that never gives a valid preference fails the correction.

The LLM is not asked about a correction the rules already rejected. The result is a `Verification`
with every reason it failed, kept with the correction.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.correct.cases import Case
from flywheel.llm import BadReply, ask_until_valid
from flywheel.records import Finding, Message, Verification
from flywheel.settings import Settings

RULE = "rule"


class Preference(BaseModel):
    """The verifier model's structured answer. No length limits in the schema (OpenAI's strict mode has
    none); the reason is clipped after parsing."""

    model_config = ConfigDict(extra="forbid")

    prefers: Literal["correction", "original"] = Field(description="which answer the agent should have sent")
    reason: str = Field(description="why, in one or two sentences")


REASON_CHARS = 500


def describe_finding(finding: Finding) -> str:
    detail = f": {finding.detail}" if finding.detail else ""
    return f"rule judge ({finding.check}) found {finding.problem_type} ({finding.severity}){detail}"


def _same_text(a: str | None, b: str | None) -> bool:
    return " ".join((a or "").split()) == " ".join((b or "").split())


class Verifier:
    """Checks corrections for one settings object. `rule_judge` is any object with the RuleJudge
    `check(interaction, answer, reference)` method; by default the configured RuleJudge."""

    def __init__(self, settings: Settings, rule_judge: Any = None):
        if rule_judge is None:
            from flywheel.evals.rule_judge import RuleJudge

            rule_judge = RuleJudge(settings)
        self.settings = settings
        self.rules = rule_judge

    @property
    def llm_name(self) -> str:
        return f"{RULE}+llm:{self.settings.llm.verifier_model}"

    def rule_reasons(self, case: Case, answer: str) -> list[str]:
        reasons: list[str] = []
        original = case.original
        if original is not None and not original.tool_calls and _same_text(original.content, answer):
            reasons.append("the correction repeats the original answer")
        findings = self.rules.check(case.interaction, Message(role="assistant", content=answer), case.reference)
        reasons.extend(describe_finding(f) for f in findings)
        return reasons

    def verify_rules(self, case: Case, answer: str) -> Verification:
        reasons = self.rule_reasons(case, answer)
        return Verification(passed=not reasons, reasons=reasons, verifier=RULE)

    async def verify(self, case: Case, answer: str, preference_model: Any, messages: list[Any]) -> Verification:
        """Rules, then the LLM's preference. `preference_model` is a runnable returning `Preference`
        (a ChatOpenAI with structured output); `messages` the verifier prompt for this case."""
        reasons = self.rule_reasons(case, answer)
        if reasons:
            return Verification(passed=False, reasons=reasons, verifier=RULE)
        preference, problem = await ask_preference(preference_model, messages, self.settings.correct.llm_retries)
        if preference is None:
            return Verification(passed=False, reasons=[problem], verifier=self.llm_name)
        why = " ".join(preference.reason.split())[:REASON_CHARS]
        if preference.prefers != "correction":
            return Verification(passed=False, reasons=[f"the LLM verifier prefers the original answer: {why}"], verifier=self.llm_name)
        return Verification(passed=True, reasons=[f"the LLM verifier prefers the correction: {why}"], verifier=self.llm_name)


def reply_problem(exc: BaseException) -> tuple[str, str]:
    """(detail, kind) when `exc` means the model's reply was unusable: not JSON, out of schema, cut off
    by the length limit or a content filter. Anything else (endpoint errors, bugs) is re-raised."""
    import openai

    if isinstance(exc, (ValueError, openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError)):
        detail = " ".join(str(exc).split())[:300]
        if isinstance(exc, ValidationError):
            kind = "out of schema: " + "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['type']}" for e in exc.errors()[:5])
        else:
            kind = f"unparsable ({type(exc).__name__})"
        return f"{type(exc).__name__}: {detail}", kind
    raise exc


def _preference(reply: Any) -> Preference:
    preference = reply if isinstance(reply, Preference) else Preference.model_validate(reply)
    if not preference.reason.strip():
        raise BadReply("the reason is blank")
    return preference


async def ask_preference(model: Any, messages: list[Any], retries: int) -> tuple[Preference | None, str]:
    """Ask for a preference, re-asking when the reply is unusable. Endpoint errors propagate (the
    bounded runner retries those); returns (None, why) when no attempt gave a valid preference."""
    preference, problem, calls = await ask_until_valid(model, messages, retries, _preference, reply_problem, "preference object")
    if preference is None:
        return None, f"the LLM verifier gave no valid preference in {calls} attempt(s): {problem}"
    return preference, ""
