"""The capture rules, defined once: which signals make an interaction a failure candidate.

`rule_conditions(settings.rules)` gives each rule that is switched on as a small condition over the
interaction's signals. The same conditions are read two ways:

- in Python, `matched_rules` (the source of truth: triage stores what it says);
- in SQL, by flywheel.store.capture, which pre-selects candidates for triage and, negated, the quiet
  interactions that stable answers (replay, usual replies) come from.

So a rule switched off in settings stops capturing and stops keeping its rows out of replay at once.
The SQL reading may keep a few more rows than Python accepts (SQL's trim only strips spaces), which
errs on the safe side for capture; stable answers check `matched_rules` again on what SQL returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from flywheel.records import Interaction, Signals
from flywheel.settings_sections import RuleSettings

# Highest-risk first under the default weights; only breaks ties between equal weights.
RULES = ("qa_reject", "high_value_negative", "complaint", "escalation", "qa_risk", "repeated_followups", "thumbs_down")

Op = Literal["equals", "true", "at_least", "filled", "one_of_folded"]


@dataclass(frozen=True)
class Test:
    """One test of one signal (a Signals field, also an `interactions` column of the same name)."""

    signal: str
    op: Op
    value: Any = None

    def holds(self, signals: Signals) -> bool:
        found = getattr(signals, self.signal)
        if self.op == "equals":
            return found == self.value
        if self.op == "true":
            return bool(found)
        if self.op == "at_least":
            return found >= self.value
        if self.op == "filled":  # a text with something in it
            return bool(found and found.strip())
        if self.op == "one_of_folded":  # trimmed, case-folded, not empty, among the values (lower case)
            text = (found or "").strip().lower()
            return bool(text) and text in self.value
        raise ValueError(f"unknown test {self.op!r}")


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]

    def holds(self, signals: Signals) -> bool:
        return any(p.holds(signals) for p in self.parts)


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]

    def holds(self, signals: Signals) -> bool:
        return all(p.holds(signals) for p in self.parts)


Condition = Test | AnyOf | AllOf

THUMBS_DOWN = Test("feedback", "equals", "down")
ESCALATED = Test("escalated_to_human", "true")
COMPLAINT = Test("complaint", "filled")


def high_value(rules: RuleSettings) -> Test:
    return Test("user_tier", "one_of_folded", frozenset(t.lower() for t in rules.high_value_tiers))


def rule_conditions(rules: RuleSettings) -> dict[str, Condition]:
    """The rules switched on in `rules`, by name, each with the condition that makes it match."""
    found: dict[str, Condition] = {}
    if rules.thumbs_down:
        found["thumbs_down"] = THUMBS_DOWN
    if rules.escalation:
        found["escalation"] = ESCALATED
    found["repeated_followups"] = Test("followups", "at_least", rules.followups_min)
    if "Reject" in rules.qa_verdicts:
        found["qa_reject"] = Test("qa_verdict", "equals", "Reject")
    if "Risk" in rules.qa_verdicts:
        found["qa_risk"] = Test("qa_verdict", "equals", "Risk")
    if rules.complaint:
        found["complaint"] = COMPLAINT
    if rules.high_value_tiers:  # any negative signal from a high-value user, whatever the toggles above
        found["high_value_negative"] = AllOf((high_value(rules), AnyOf((THUMBS_DOWN, ESCALATED, COMPLAINT))))
    return found


def is_high_value(interaction: Interaction, rules: RuleSettings) -> bool:
    return high_value(rules).holds(interaction.signals)


def matched_rules(interaction: Interaction, rules: RuleSettings) -> list[str]:
    """Every rule that catches this interaction, highest weight first."""
    found = [name for name, condition in rule_conditions(rules).items() if condition.holds(interaction.signals)]
    return sorted(found, key=lambda r: (-rules.weights.get(r, 1.0), RULES.index(r)))
