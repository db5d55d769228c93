"""Approvals in the browser: what waits for a decision, the evidence behind it, and the decision itself.

What waits: every approval an agent run is paused on (flywheel.agent.runner.pending_approvals), and any
version that passed its gate with no decision on its current report and no run waiting (evaluated by
hand with `flywheel eval`).

Deciding goes through the one approval path, as the terminal and Slack do (ARCHITECTURE principle 4):
a run that waits is answered with flywheel.agent.runner.decide (which records the decision through
flywheel.release.approvals and resumes the run to its promotion node); a version with no run is
recorded and promoted with flywheel.release.approvals directly, as `flywheel approve` does. The form
carries the report hash the person looked at: a decision on a report that changed since is refused.
A decision already recorded on that report (a double click, a second tab, Slack a moment earlier)
changes nothing and says who decided. Channel "web": only names in `approvals.approvers` may decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup

from flywheel.agent import runner
from flywheel.console.web import Console
from flywheel.errors import NotFoundError, PolicyViolation, UserInputError
from flywheel.evals.charts import BarPair, Change, diverging_bars, grouped_bars
from flywheel.evals.gate import SET_LABELS
from flywheel.evals.report import SET_ORDER
from flywheel.records import Record
from flywheel.release import approvals, decisions, registry
from flywheel.release.canary import CanaryEvidence, approval_evidence
from flywheel.release.evaluation import verified_report
from flywheel.release.records import Channel, DecisionKind, ModelVersion

CHANNEL: Channel = "web"


class Waiting(Record):
    """One line of the approvals list."""

    version: str
    report_hash: str
    run_id: str | None = None  # None: no agent run waits; the decision promotes directly
    summary: str
    requested_at: Any = None


def pending(console: Console) -> list[Waiting]:
    """Every decision waiting: runs paused on an approval first, then gate-passed versions nobody decided."""
    ctx = console.ctx
    out = [
        Waiting(version=p.version, report_hash=p.report_hash, run_id=p.run_id, summary=p.summary, requested_at=p.requested_at)
        for p in runner.pending_approvals(ctx)
    ]
    asked = {w.version for w in out}
    champion = registry.alias_target(ctx.store, registry.CHAMPION)
    for row in registry.list_versions(ctx.store):
        if row.id in asked or row.approval or not row.gate_passed:
            continue
        target = registry.resolve(ctx.store, row.id)
        if decisions.skip_reason(target, champion) is None:
            out.append(
                Waiting(version=row.id, report_hash=target.eval_report_hash or "", summary=f"{row.id} passed its gate; no run waits on it")
            )
    return out


# --- the evidence -------------------------------------------------------------------------------------------


class RateDiff(Record):
    name: str
    before: float | None
    after: float | None
    before_n: str = ""
    after_n: str = ""
    targeted: bool = False

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before


@dataclass
class Evidence:
    """What the page shows (a dataclass: the charts are Markup, which pydantic cannot hold)."""

    version: ModelVersion
    waiting: Waiting | None
    decided: str | None  # "approved by alice (web)" once someone decided this report
    report: dict[str, Any]
    checks: list[dict[str, Any]]  # the gate's checks, failing ones first
    primary: str | None  # the set the rate tables come from
    types: list[RateDiff]
    intents: list[RateDiff]
    charts: list[Markup]
    canary: CanaryEvidence | None
    report_url: str


def evidence(console: Console, version: str) -> Evidence:
    """Everything the approval page shows for `version`; the report is checked against its recorded hash."""
    ctx = console.ctx
    target = registry.resolve(ctx.store, version)
    document, _path = verified_report(target)
    waiting = next((w for w in pending(console) if w.version == target.id), None)
    before, after = document.get("champion_metrics") or {}, document.get("candidate_metrics") or {}
    primary = next((n for n in SET_ORDER if (after.get(n) or {}).get("size")), None)
    targeted = set(document.get("targeted") or [])
    types = _diffs(before.get(primary) or {}, after.get(primary) or {}, "problem_rates", targeted) if primary else []
    intents = _diffs(before.get(primary) or {}, after.get(primary) or {}, "per_intent", set()) if primary else []
    checks = sorted((document.get("gate") or {}).get("checks") or [], key=lambda c: (bool(c.get("passed")), bool(c.get("skipped"))))
    return Evidence(
        version=target,
        waiting=waiting,
        decided=decided_text(console, target.id, target.eval_report_hash or ""),
        report=document,
        checks=checks,
        primary=SET_LABELS.get(primary or "", primary),
        types=types,
        intents=intents,
        charts=_charts(types, intents, SET_LABELS.get(primary or "", "")),
        canary=approval_evidence(ctx.store, target.id),
        report_url=f"/reports/{target.id}",
    )


def _diffs(before: dict[str, Any], after: dict[str, Any], key: str, targeted: set[str]) -> list[RateDiff]:
    b, a = before.get(key) or {}, after.get(key) or {}
    rows = []
    for name in dict.fromkeys([*b, *a]):
        rb, ra = b.get(name), a.get(name)
        rows.append(
            RateDiff(
                name=name,
                before=rb["rate"] if rb else None,
                after=ra["rate"] if ra else None,
                before_n=f"{rb['count']}/{rb['n']}" if rb else "",
                after_n=f"{ra['count']}/{ra['n']}" if ra else "",
                targeted=name in targeted,
            )
        )
    return rows


def _charts(types: list[RateDiff], intents: list[RateDiff], set_label: str) -> list[Markup]:
    """The report's own SVG charts (flywheel.evals.charts): problem rates before and after, and the
    change in success per intent."""
    charts = []
    if types:
        bars = [
            BarPair(label=t.name, before=t.before or 0.0, after=t.after or 0.0, emphasis=t.targeted, note="targeted" if t.targeted else "")
            for t in types
        ]
        charts.append(Markup(grouped_bars(bars, f"Problem rate per type, {set_label} (lower is better)")))
    changes = [
        Change(label=i.name, delta=i.change or 0.0, detail=f"({i.before_n} -> {i.after_n})") for i in intents if i.change is not None
    ]
    if changes:
        charts.append(Markup(diverging_bars(changes, f"Success change per intent, {set_label}")))
    return charts


def decided_text(console: Console, version: str, report_hash: str) -> str | None:
    for row in approvals.approvals_for(console.ctx.store, version):
        if row.report_hash == report_hash:
            return f"{row.decision} by {row.approver} ({row.channel})" + (f": {row.reason}" if row.reason else "")
    return None


def report_file(console: Console, version: str) -> Path:
    """The report.html of a version's recorded report (its report.json checked against the hash first)."""
    target = registry.resolve(console.ctx.store, version)
    _document, path = verified_report(target)
    html = path.with_name("report.html")
    if not html.is_file():
        raise NotFoundError(f"{target.id}: {html} is missing; evaluate it again")
    return html


# --- deciding -----------------------------------------------------------------------------------------------


class Answer(Record):
    ok: bool
    text: str


def decide(console: Console, user: str, version: str, report_hash: str, decision: DecisionKind, reason: str) -> Answer:
    """Apply a person's click once (see the module's docstring). Raises PolicyViolation for a user who
    is not an approver and UserInputError for a rejection without a reason; any other refusal comes
    back as an Answer that changed nothing."""
    ctx = console.ctx
    approvals.check_approver(ctx.settings, user, CHANNEL)
    if decision == "rejected" and not reason.strip():
        raise UserInputError("a rejection needs a reason")
    with console.decide_lock:
        target = registry.resolve(ctx.store, version)
        earlier = decided_text(console, target.id, report_hash)
        if earlier:
            return Answer(ok=False, text=f"Already decided: {target.id} was {earlier}. Nothing changed.")
        if report_hash != target.eval_report_hash:
            return Answer(
                ok=False,
                text=f"{target.id}'s report changed since this page was shown ({report_hash[:12]} -> "
                f"{(target.eval_report_hash or '')[:12]}); nothing was decided. Look at the new report.",
            )
        try:
            return _apply(console, user, target, decision, reason)
        except (PolicyViolation, UserInputError) as exc:  # lost a race to another way in, or a check failed
            earlier = decided_text(console, target.id, report_hash)
            text = f"Already decided: {target.id} was {earlier}. Nothing changed." if earlier else f"Nothing was decided: {exc}"
            return Answer(ok=False, text=text)


def _apply(console: Console, user: str, target: ModelVersion, decision: DecisionKind, reason: str) -> Answer:
    ctx = console.ctx
    run = runner.waiting_run(ctx, target.id)
    if run is not None:
        outcome = runner.decide(ctx, run.id, decision, user, reason, CHANNEL)
        if outcome.state == "waiting_approval":  # the promotion node refused it; the run asks again
            refused = (outcome.pending.refused if outcome.pending else None) or outcome.message
            return Answer(ok=False, text=f"Not applied: {refused}")
        if outcome.outcome:
            done = decisions.DecisionOutcome.model_validate(outcome.outcome)
            return Answer(ok=done.error is None, text=done.sentence())
        return Answer(ok=outcome.state != "failed", text=outcome.message or f"run {run.id} is {outcome.state}")
    if decision == "rejected":
        rejection = approvals.reject(ctx.store, target.id, user, reason, CHANNEL)
        return Answer(ok=True, text=f"{target.id} rejected by {user}; {len(rejection.returned_to_pool)} samples stay in the pool.")
    approvals.record_approval(ctx.store, target.id, "approved", user, CHANNEL, reason)
    promoted = approvals.promote(ctx.store, ctx.settings, target.id, actor=user)
    previous = f" (previous: {promoted.previous})" if promoted.previous else ""
    return Answer(ok=True, text=f"{target.id} promoted to champion, approved by {user} ({CHANNEL}){previous}.")
