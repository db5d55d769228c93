"""The rule judge: checks every assistant answer against the configured policies, with no LLM.

It always runs: on captured failures (before and alongside the LLM judge) and on every model answer
in evaluation, so `RuleJudge.check` is pure (no I/O, no state) and fast (regexes and the JSON-schema
validator are compiled once, in the constructor).

Checks, each giving `Finding`s:
  empty        no text and no tool call                          -> format_error
  output_schema  policies.output_schema set: the answer text must
               parse as JSON and validate                          -> format_error
  policy:<name>  a policies.forbidden_phrases regex matches outside
               a negated clause ("never promise a refund" is the
               policy, not a promise; see `_negated`)              -> its own problem_type, severity
  tool_call    a tool outside policies.allowed_tools (when that
               list is non-empty), or arguments that are not a
               JSON object                                         -> wrong_tool_call
  intent       the reference names an intent and the answer's JSON
               "intent" field names another                        -> wrong_intent
  label_answer (captured failures only, `label_findings`) a person's
               label gives an answer that differs from the logged
               one, and the intent check found nothing             -> missing_knowledge

A built-in check whose problem type is not in the configured taxonomy is switched off (listed in
`RuleJudge.disabled`); a policy pattern naming an unknown problem type is a SettingsError.

What the findings mean for a captured failure is `verdict_from_findings`: findings prove a failure;
no finding proves nothing (the user complained for a reason), so the failure stays unjudged until the
LLM judge or a human label decides, unless a Reference shows the answer was the right one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flywheel.errors import SettingsError
from flywheel.records import Finding, Interaction, Message, Reference, Verdict
from flywheel.settings import SEVERITIES, Settings

SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
ACCEPTANCE_FOR_SEVERITY = {"low": "Accept", "medium": "Risk", "high": "Reject", "critical": "Reject"}
NO_FINDING_REASON = "no rule finding; needs the LLM judge or a label"
_DETAIL_CHARS = 200

# Problem types the built-in checks report, by check.
_BUILTIN = {
    "empty": "format_error",
    "output_schema": "format_error",
    "tool_call": "wrong_tool_call",
    "intent": "wrong_intent",
    "label_answer": "missing_knowledge",
}


class RuleJudge:
    """Compiled policy checks. Build once per settings; `check` is safe to call from many threads."""

    name = "rule"

    def __init__(self, settings: Settings):
        taxonomy = settings.taxonomy
        policies = settings.policies
        self._default_severity = dict(taxonomy.default_severity)
        self.disabled = sorted({check for check, ptype in _BUILTIN.items() if ptype not in taxonomy.problem_types})
        self._schema = policies.output_schema or None
        self._validator = _compile_schema(self._schema) if self._schema else None
        self._patterns: list[tuple[Any, re.Pattern[str]]] = []
        for index, policy in enumerate(policies.forbidden_phrases):
            where = f"policies.forbidden_phrases[{index}] ({policy.name})"
            if policy.problem_type not in taxonomy.problem_types:
                raise SettingsError(where, f"problem_type {policy.problem_type!r} is not in taxonomy.problem_types")
            try:
                self._patterns.append((policy, re.compile(policy.pattern, re.IGNORECASE | re.DOTALL)))
            except re.error as exc:
                raise SettingsError(where, f"pattern is not a valid regular expression: {exc}") from None
        self._allowed_tools = frozenset(policies.allowed_tools)

    # --- the checks -----------------------------------------------------------------------------------

    def check(self, interaction: Interaction, answer: Message | None = None, reference: Reference | None = None) -> list[Finding]:
        """Findings for `answer` (default: the interaction's last assistant message).

        Tool calls are checked in the answer and, when the answer is the interaction's own, in every
        assistant message of the final turn (after the last user message): the whole trajectory the
        model produced for that request.
        """
        own = answer is None
        if own:
            answer = interaction.last_assistant()
        turn = _final_turn(interaction) if own else ([answer] if answer is not None else [])
        return self.check_answer(answer, reference, tool_messages=turn)

    def check_answer(
        self, answer: Message | str | None, reference: Reference | None = None, tool_messages: list[Message] | None = None
    ) -> list[Finding]:
        """Findings for one answer alone (an evaluation output, a correction)."""
        if isinstance(answer, str):
            answer = Message(role="assistant", content=answer)
        findings: list[Finding] = []
        text = (answer.content or "").strip() if answer is not None else ""
        has_calls = bool(answer is not None and answer.tool_calls)
        if not text and not has_calls:
            self._add(findings, "empty", "the answer is empty")
            return findings
        parsed: Any = _NOT_JSON
        if text:
            parsed = _parse_json(text)
            self._check_schema(findings, text, parsed)
            for policy, pattern in self._patterns:
                match = _affirmed_match(pattern, text)
                if match:
                    findings.append(
                        Finding(
                            problem_type=policy.problem_type,
                            severity=policy.severity,
                            check=f"policy:{policy.name}",
                            detail=f"matched {_clip(match.group(0))!r}",
                        )
                    )
        for message in tool_messages if tool_messages is not None else ([answer] if answer is not None else []):
            for call in message.tool_calls or []:
                self._check_tool_call(findings, call.function.name, call.function.arguments)
        self._check_intent(findings, parsed, reference)
        return findings

    def label_findings(self, answer: Message | None, reference: Reference | None, findings: list[Finding]) -> list[Finding]:
        """What a human label adds to a captured failure's `findings`: a label whose answer differs from
        the logged one says the content was wrong, even when the intent was right. Evaluation does not
        use this: a test set's reference answer is one right answer, not proof that others are wrong."""
        if reference is None or not reference.answer or not reference.source.startswith("label:"):
            return findings
        if any(f.check == "intent" for f in findings) or self.confirms(answer, reference):
            return findings
        extra: list[Finding] = []
        self._add(extra, "label_answer", f"{reference.source} rewrote the answer")
        return findings + extra

    def _check_schema(self, findings: list[Finding], text: str, parsed: Any) -> None:
        if self._validator is None:
            return
        if parsed is _NOT_JSON:
            self._add(findings, "output_schema", f"the answer is not JSON: {_clip(text, 80)!r}")
            return
        errors = sorted(self._validator.iter_errors(parsed), key=lambda e: list(e.absolute_path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "(root)"
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            self._add(findings, "output_schema", f"schema violation at {where}: {_clip(first.message)}{more}")

    def _check_tool_call(self, findings: list[Finding], name: str, arguments: str) -> None:
        if self._allowed_tools and name not in self._allowed_tools:
            self._add(findings, "tool_call", f"unknown tool {_clip(name, 80)!r} (allowed: {', '.join(sorted(self._allowed_tools))})")
        args = _parse_json(arguments or "{}")
        if not isinstance(args, dict):
            self._add(findings, "tool_call", f"arguments of {_clip(name, 80)!r} are not a JSON object: {_clip(arguments or '', 80)!r}")

    def _check_intent(self, findings: list[Finding], parsed: Any, reference: Reference | None) -> None:
        if reference is None or not reference.intent or not isinstance(parsed, dict):
            return
        said = parsed.get("intent")
        if isinstance(said, str) and _norm(said) != _norm(reference.intent):
            by = f" ({reference.source})" if reference.source else ""
            self._add(findings, "intent", f"answered intent {_clip(said, 80)!r}, the reference{by} says {reference.intent!r}")

    def _add(self, findings: list[Finding], check: str, detail: str) -> None:
        if check in self.disabled:
            return
        problem_type = _BUILTIN[check]
        severity = self._default_severity.get(problem_type, "medium")
        findings.append(Finding(problem_type=problem_type, severity=severity, check=check, detail=detail))

    # --- what a reference proves ---------------------------------------------------------------------

    def confirms(self, answer: Message | None, reference: Reference | None) -> bool:
        """True when the reference shows this exact answer is right: its answer equals the reference
        answer (as JSON when both are JSON, else as text ignoring case and spacing), or a person said it
        was fine. A matching intent alone proves nothing about the rest of the answer (but see
        `intent_agrees`)."""
        if reference is not None and reference.fine and answer is not None:
            return True  # a person looked at this answer and said it was right
        if reference is None or not reference.answer or answer is None or not answer.content:
            return False
        mine, theirs = _parse_json(answer.content.strip()), _parse_json(reference.answer.strip())
        if mine is not _NOT_JSON and theirs is not _NOT_JSON:
            return mine == theirs
        return _norm(answer.content) == _norm(reference.answer)

    def intent_agrees(self, answer: Message | None, reference: Reference | None) -> bool:
        """True when the reference names an intent and the answer's JSON "intent" field is that one.
        The offline judge settles a labelled failure with no rule finding this way: the person who
        labelled it saw the answer and named the intent it gave, and nothing else can be checked."""
        if reference is None or not reference.intent or answer is None or not answer.content:
            return False
        parsed = _parse_json(answer.content.strip())
        said = parsed.get("intent") if isinstance(parsed, dict) else None
        return isinstance(said, str) and _norm(said) == _norm(reference.intent)


# --- from findings to a verdict -----------------------------------------------------------------------------


def worst(findings: list[Finding]) -> Finding | None:
    """The most severe finding; the first found among equals (checks run in a fixed order)."""
    best: Finding | None = None
    for finding in findings:
        if best is None or SEVERITY_RANK[finding.severity] > SEVERITY_RANK[best.severity]:
            best = finding
    return best


def summarize(findings: list[Finding], limit: int = 1000) -> str:
    return _clip("; ".join(f"{f.check}: {f.detail}" if f.detail else f.check for f in findings), limit)


def verdict_from_findings(
    failure_id: str, findings: list[Finding], settings: Settings, confirmed_by: Reference | None = None, judge: str = "rule"
) -> Verdict:
    """The rule judge's verdict on a captured failure.

    - findings: a failure. The worst finding gives problem_type and severity; acceptance is Reject
      for high/critical, Risk for medium, Accept for low.
    - no findings, and `confirmed_by` (a Reference that `RuleJudge.confirms`): not a failure, Accept.
    - no findings otherwise: status "unjudged" (is_failure False is only the column's filler), with
      reason NO_FINDING_REASON. A user signal caught it; no rule proves it wrong, none proves it fine.
    """
    top = worst(findings)
    if top is not None:
        return Verdict(
            failure_id=failure_id,
            is_failure=True,
            problem_type=top.problem_type,
            severity=top.severity,
            acceptance=ACCEPTANCE_FOR_SEVERITY[top.severity],
            rationale=summarize(findings),
            judge=judge,
        )
    if confirmed_by is not None:
        return Verdict(
            failure_id=failure_id,
            is_failure=False,
            acceptance="Accept",
            rationale=f"no rule finding and {_how_confirmed(confirmed_by)} ({confirmed_by.source or 'reference'})",
            judge=judge,
        )
    return Verdict(failure_id=failure_id, is_failure=False, judge=judge, status="unjudged", reason=NO_FINDING_REASON)


# --- negation ----------------------------------------------------------------------------------------------
#
# A forbidden phrase said in a negated clause is the opposite of what the pattern looks for: "we never
# promise a refund", "we cannot guarantee a refund", "there is no guarantee of a refund". Policies are
# written this way (the knowledge base's "Never promise or guarantee a refund"), so without this rule
# every answer that quotes or follows a policy would be flagged for the policy's own words. It is one
# rule for every pattern, so no pattern has to spell out its negations.
#
# The rule reads only the clause before the match: back to the last sentence or clause boundary, and
# at most NEGATION_WINDOW words. A boundary ends the negation's reach, so in "I can't promise a refund,
# but we guarantee a full refund" the second clause is still a promise; the window keeps a negation far
# back in a long clause ("we never let you down and we guarantee ...") from cancelling the promise.
# When in doubt the phrase stays a finding: a missed promise costs more than a needless correction.

NEGATION_WINDOW = 4  # words: "we are not able to promise" has its "not" three words back
_LOOKBACK_CHARS = 200  # more than NEGATION_WINDOW words need; keeps the check cheap on long answers
_CLAUSE_BOUNDARY = re.compile(r"[.!?;:,()\[\]\n]|\b(?:but|however|although|though|yet|whereas|while)\b", re.IGNORECASE)
_NEGATION = re.compile(r"(?:not|never|cannot|nor|neither|without|unable|\w+n['’]t)", re.IGNORECASE)


def _negated(text: str, start: int) -> bool:
    """True when the clause that ends at `start` negates what follows it."""
    before = text[max(0, start - _LOOKBACK_CHARS) : start]
    boundaries = list(_CLAUSE_BOUNDARY.finditer(before))
    clause = before[boundaries[-1].end() :] if boundaries else before
    words = [w.strip("\"'“”‘*_") for w in clause.split()][-NEGATION_WINDOW:]
    # "no" negates only the phrase right after it ("no guarantee of a refund"); further back it is more
    # often an interjection ("no problem we guarantee a refund") than a negation.
    if words and words[-1].casefold() == "no":
        return True
    return any(_NEGATION.fullmatch(w) for w in words)


def _affirmed_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The first match of `pattern` that is not negated. After a negated match the search goes on from
    its next character, not its end: the pattern's gap (".{0,40}") can swallow a later, affirmed phrase
    ("can't promise a refund, but we guarantee a full refund" matches from "promise")."""
    pos = 0
    while (match := pattern.search(text, pos)) is not None:
        if not _negated(text, match.start()):
            return match
        pos = match.start() + 1
    return None


# --- helpers ---------------------------------------------------------------------------------------------


def _how_confirmed(reference: Reference) -> str:
    if reference.fine:
        return "a person said the answer was fine"
    if reference.answer:
        return "the answer matches the reference"
    return f"the answer gives the intent the reference names, {reference.intent!r}"


class _NotJson:
    def __repr__(self) -> str:
        return "<not json>"


_NOT_JSON: Any = _NotJson()


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _compile_schema(schema: dict[str, Any]) -> Any:
    from jsonschema import exceptions, validators

    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        raise SettingsError("policies.output_schema", f"not a valid JSON schema: {exc.message}") from None
    return cls(schema)


def _final_turn(interaction: Interaction) -> list[Message]:
    last_user = -1
    for index, message in enumerate(interaction.messages):
        if message.role == "user":
            last_user = index
    return [m for m in interaction.messages[last_user + 1 :] if m.role == "assistant"]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _clip(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
