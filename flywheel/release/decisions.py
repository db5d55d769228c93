"""The human decision on a candidate: what a person is asked (PendingApproval), and how their answer
(a flywheel.release.records.Decision) is checked and applied.

Approval is code, not a prompt (ARCHITECTURE principle 4). There is no tool that promotes. When a
candidate has passed its gate, the agent's graph reaches its approval node, which pauses the run with
LangGraph's `interrupt(PendingApproval)`. A person answers from any way in (the terminal, `flywheel
approve`, Slack) and the run resumes with `Command(resume=Decision(...))`. The promotion node then
calls `apply_decision`: it records the decision with flywheel.release.approvals (bound to the version
AND the report hash the person saw, from an approver the settings allow) and promotes through
`approvals.promote`, which checks all of it again and switches the alias under an effect key derived
from the run, the version and the report: a node that runs twice after a crash switches once.

A rejection records the reason; flywheel.release.approvals then marks the version rejected and leaves
the samples of its dataset in the pool for the next cycle.

Nothing here knows about LangGraph: the same payload and the same checks serve the graph, `flywheel
chat`, the runner's `decide` and Slack.
"""

from __future__ import annotations

from datetime import datetime

from flywheel.context import Context
from flywheel.errors import PolicyViolation, UserInputError
from flywheel.records import Record, utcnow
from flywheel.release import approvals, baseline_review, graduation, registry
from flywheel.release.baseline_review import BaselineProposal
from flywheel.release.canary import CanaryEvidence, approval_evidence
from flywheel.release.evaluation import summarize_report, verified_report
from flywheel.release.records import Decision, DecisionKind, ModelVersion
from flywheel.release.registry import CLOSED


class PendingApproval(Record):
    """What the approval node shows a person (the interrupt's payload, and `runs.pending`)."""

    run_id: str
    version: str
    report_hash: str
    report_json: str
    report_html: str | None = None
    champion: str | None = None
    dataset_id: str | None = None
    job_id: str | None = None
    gate_passed: bool
    gate_reasons: list[str] = []  # every check's sentence, failing ones first (the first few)
    targeted: list[str] = []
    primary_set: str | None = None  # the set the headline numbers come from
    task_success_before: float | None = None
    task_success_after: float | None = None
    problem_rates_before: dict[str, float] = {}
    problem_rates_after: dict[str, float] = {}
    summary: str
    # baseline samples approving would move up a tier (flywheel.release.baseline_review)
    baselines: list[BaselineProposal] = []
    refused: str | None = None  # why the previous answer was not accepted
    canary: CanaryEvidence | None = None  # the newest canary observation's decision and evidence
    requested_at: datetime

    def answer_hint(self) -> str:
        return f"flywheel approve {self.version}   or   flywheel reject {self.version} --reason TEXT   (run {self.run_id})"


# --- before asking ------------------------------------------------------------------------------------------


def skip_reason(target: ModelVersion, champion: str | None) -> str | None:
    """Why this version needs no decision now (None: it needs one)."""
    if target.gate_passed is not True or not target.eval_report_hash:
        return f"{target.id} has not passed its gate"
    if target.status in CLOSED:
        return f"{target.id} is {target.status}"
    if champion == target.id:
        return f"{target.id} is already the champion"
    return None


def stored_decision(ctx: Context, target: ModelVersion) -> tuple[Decision | None, str | None]:
    """A decision someone already recorded on this version's current report (through `decide`, another
    way in, or before a crash), and the run it was recorded for."""
    for row in approvals.approvals_for(ctx.store, target.id):
        if row.report_hash == target.eval_report_hash:
            decision = Decision(row.decision, row.approver, row.reason or "recorded earlier", row.channel, row.report_hash)
            return decision, row.run_id
    return None, None


def build_pending(ctx: Context, run_id: str, target: ModelVersion, champion: str | None, refused: str | None = None) -> PendingApproval:
    """The payload: version, gate result, report summary and path, problem rates before and after."""
    document, path = verified_report(target)
    report = summarize_report(target.id, target.eval_report_hash or "", path, document)
    primary = next(iter(report.sets), None)
    numbers = report.sets.get(primary) if primary else None
    targeted = ", ".join(report.targeted) or "none named"
    headline = (
        f"task success {numbers.task_success_before:.1%} -> {numbers.task_success_after:.1%} on the {primary} set"
        if numbers
        else "no set had items to measure"
    )
    failed = len(report.failed_checks)
    proposals = baseline_review.propose(ctx.store, target.id, document)
    climbing = baseline_review.summary(proposals)
    return PendingApproval(
        run_id=run_id,
        version=target.id,
        report_hash=target.eval_report_hash or "",
        report_json=str(path),
        report_html=report.report_html,
        champion=champion or report.champion or None,
        dataset_id=target.dataset_id,
        job_id=target.job_id,
        gate_passed=bool(target.gate_passed),
        gate_reasons=report.reasons,
        targeted=report.targeted,
        primary_set=primary,
        task_success_before=numbers.task_success_before if numbers else None,
        task_success_after=numbers.task_success_after if numbers else None,
        problem_rates_before=numbers.problem_rates_before if numbers else {},
        problem_rates_after=numbers.problem_rates_after if numbers else {},
        summary=(
            f"{target.id} passed its promotion gate against {champion or 'the base model'} "
            f"({failed} failed checks; targeted: {targeted}); {headline}." + (f" {climbing[0].upper()}{climbing[1:]}." if climbing else "")
        ),
        baselines=proposals,
        refused=refused,
        canary=approval_evidence(ctx.store, target.id),
        requested_at=utcnow(),
    )


def refusal(ctx: Context, target: ModelVersion, decision: Decision) -> str | None:
    """Why this decision cannot be applied (None: it can): an approver the settings do not allow on its
    channel, or a decision made on a report that is no longer the version's."""
    try:
        approvals.check_approver(ctx.settings, decision.approver, decision.channel)
    except (PolicyViolation, UserInputError) as exc:
        return str(exc)
    if decision.report_hash and decision.report_hash != target.eval_report_hash:
        return (
            f"the decision was made on report {decision.report_hash[:12]}, but {target.id}'s report is now "
            f"{(target.eval_report_hash or '')[:12]}; decide again on the new report"
        )
    return None


# --- the promotion node ---------------------------------------------------------------------------------------


class DecisionOutcome(Record):
    version: str
    decision: DecisionKind
    approver: str
    channel: str
    promoted: bool = False
    previous: str | None = None
    replayed: bool = False  # the switch had happened already (a re-run after a crash): nothing changed now
    graduated: int = 0
    down_weighted: int = 0
    regressed: int = 0  # baseline samples the promoted version fails again: back to problem
    confirmed: int = 0  # baseline samples moved up a tier with the approval
    returned_to_pool: int = 0
    note: str = ""
    error: str | None = None  # the decision could not be applied: nothing changed

    def sentence(self) -> str:
        if self.error:
            return f"{self.version} was not changed: {self.error}"
        if self.decision == "rejected":
            pool = f"; {self.returned_to_pool} samples stay in the pool" if self.returned_to_pool else ""
            return f"{self.version} rejected by {self.approver}{pool}."
        extra = f" (previous: {self.previous})" if self.previous else ""
        again = " It already was: nothing changed." if self.replayed else ""
        grads = (
            f" {self.graduated} samples graduated, {self.down_weighted} down-weighted, {self.regressed} back to problem."
            if (self.graduated or self.down_weighted or self.regressed)
            else ""
        )
        grads += f" {self.confirmed} baseline samples moved up a tier." if self.confirmed else ""
        return f"{self.version} promoted to champion, approved by {self.approver} ({self.channel}){extra}.{again}{grads}"


def promotion_key(run_id: str, version: str, report_hash: str) -> str:
    return registry.effect_key("agent-promote", run_id, version, report_hash[:16])


def apply_decision(ctx: Context, run_id: str, version: str, decision: Decision) -> DecisionOutcome:
    """Record the decision and act on it. Every step is idempotent: run twice, it changes things once.
    A check that fails (an approver no longer allowed, a version someone else already decided, a report
    that changed) leaves everything as it was and says why."""
    store, settings = ctx.store, ctx.settings
    outcome = DecisionOutcome(version=version, decision=decision.decision, approver=decision.approver, channel=decision.channel)
    target = registry.resolve(store, version)
    problem = refusal(ctx, target, decision)
    if problem:
        outcome.error = problem
        return outcome
    try:
        if decision.decision == "rejected":
            rejection = approvals.reject(store, version, decision.approver, decision.reason, decision.channel, run_id=run_id)
            outcome.returned_to_pool = len(rejection.returned_to_pool)
            outcome.note = rejection.pool_note
            return outcome
        approvals.record_approval(store, version, "approved", decision.approver, decision.channel, decision.reason, run_id=run_id)
        # proposed before the switch, as the person saw them: afterwards this promotion's own graduates
        # would look like baselines of an earlier cycle
        proposals = _proposals(ctx, target) if decision.confirm_baselines else []
        done = approvals.promote(
            store, settings, version, actor=decision.approver, effect_key=promotion_key(run_id, version, target.eval_report_hash or "")
        )
    except (PolicyViolation, UserInputError) as exc:
        outcome.error = str(exc)
        return outcome
    outcome.promoted, outcome.previous, outcome.replayed = True, done.previous, done.replayed
    _graduate(ctx, target, decision.approver, outcome)
    outcome.confirmed = len(baseline_review.confirm(store, target.id, proposals, decision.approver))
    return outcome


def _proposals(ctx: Context, target: ModelVersion) -> list[BaselineProposal]:
    try:
        document, _path = verified_report(target)
    except (OSError, ValueError, UserInputError):
        return []  # the promotion itself re-checks the report and says what is wrong
    return baseline_review.propose(ctx.store, target.id, document)


def _graduate(ctx: Context, target: ModelVersion, actor: str, outcome: DecisionOutcome) -> None:
    """Move samples by how the promoted version did on them (flywheel.release.graduation; a second run
    moves nothing). A report that cannot be read, or no longer matches its recorded hash, leaves the
    samples where they are, noted."""
    try:
        document, _path = verified_report(target)
        fixed = graduation.outcomes_from_report(document)
        if not fixed:
            return
        fixed = baseline_review.fixed_on_traffic(ctx.store, target.id, fixed)
        result = graduation.graduate(ctx.store, ctx.settings, target.id, fixed=fixed, actor=actor)
    except (OSError, ValueError, UserInputError, PolicyViolation) as exc:
        outcome.note = f"samples not graduated: {exc}"
        return
    outcome.graduated, outcome.down_weighted, outcome.regressed = len(result.graduated), len(result.down_weighted), len(result.regressed)
