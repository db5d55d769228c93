"""What an approval request looks like in Slack (Block Kit), and what its buttons carry.

Kept apart from the Bolt app so that the message can be read (and tested) without a Slack connection.
Every piece of text that comes from the store (summaries, problem-type names, reasons) is escaped for
Slack's mrkdwn: a name like "<!channel>" must reach people as text, not as a ping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel.errors import UserInputError
from flywheel.records import Record
from flywheel.release.decisions import PendingApproval
from flywheel.settings import Settings

ACTION_APPROVE = "flywheel_approve"
ACTION_REJECT = "flywheel_reject"
ACTIONS_BLOCK = "flywheel_approval"
VIEW_REJECT = "flywheel_reject_reason"
REASON_BLOCK, REASON_INPUT = "reason", "reason_input"
EVENT_TYPE = "flywheel_approval"  # message metadata: finds a posted request again after a crash

MAX_TEXT = 2900  # Slack refuses a section text over 3000 characters
MAX_RATES = 8


class ApprovalRef(Record):
    """What a button (or the reject dialog) carries: which run, which candidate, which report it shows.
    A decision is only applied when all three still match the run's pending approval."""

    run_id: str
    version: str
    report_hash: str

    def value(self) -> str:
        return json.dumps({"run": self.run_id, "version": self.version, "hash": self.report_hash}, separators=(",", ":"))

    @classmethod
    def parse(cls, value: str | None) -> ApprovalRef:
        try:
            data = json.loads(value or "")
            return cls(run_id=str(data["run"]), version=str(data["version"]), report_hash=str(data["hash"]))
        except (ValueError, KeyError, TypeError):
            raise UserInputError(f"not a flywheel approval button value: {str(value)[:80]!r}") from None

    @classmethod
    def of(cls, pending: PendingApproval) -> ApprovalRef:
        return cls(run_id=pending.run_id, version=pending.version, report_hash=pending.report_hash)


class MessageRef(Record):
    """Where a posted request lives: the channel id and the message timestamp."""

    channel: str
    ts: str


def escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mention(approver: str, channel: str) -> str:
    """A Slack user id as a mention; any other approver name as plain text."""
    return f"<@{approver}>" if channel == "slack" else escape(approver)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def report_link(settings: Settings, pending: PendingApproval) -> str:
    """A link when `slack.report_url` serves the artifacts folder; else the report's path, as code."""
    path = Path(pending.report_html or pending.report_json)
    if settings.slack.report_url:
        try:
            relative = path.resolve().relative_to(settings.artifacts_path.resolve()).as_posix()
        except ValueError:
            relative = ""
        if relative:
            return f"<{settings.slack.report_url.rstrip('/')}/{relative}|open the report>"
    return f"`{escape(path)}`"


def _rates(pending: PendingApproval) -> str:
    names = sorted(
        set(pending.problem_rates_before) | set(pending.problem_rates_after),
        key=lambda n: (n not in pending.targeted, -pending.problem_rates_before.get(n, 0.0), n),
    )
    lines = [
        f"• {escape(n)}{' (targeted)' if n in pending.targeted else ''}: "
        f"{_pct(pending.problem_rates_before.get(n))} → {_pct(pending.problem_rates_after.get(n))}"
        for n in names[:MAX_RATES]
    ]
    if len(names) > MAX_RATES:
        lines.append(f"… and {len(names) - MAX_RATES} more in the report")
    return "\n".join(lines)


def fallback_text(pending: PendingApproval) -> str:
    return f"{pending.version} waits for approval: {pending.summary}"[:MAX_TEXT]


def approval_blocks(settings: Settings, pending: PendingApproval, outcome: str | None = None) -> list[dict[str, Any]]:
    """The request: summary, key numbers, problem rates, the canary's decision and evidence, a link to
    the report and, while it is open, Approve and Reject buttons. With `outcome`, the same message closed: the buttons give way to it."""
    title = f"Approval needed: {pending.version}" if outcome is None else f"Decided: {pending.version}"
    fields = [
        f"*Gate*\n{'passed' if pending.gate_passed else 'failed'}",
        f"*Champion*\n{escape(pending.champion or 'the base model')}",
        f"*Task success ({escape(pending.primary_set or 'n/a')} set)*\n"
        f"{_pct(pending.task_success_before)} → {_pct(pending.task_success_after)}",
        f"*Targeted*\n{escape(', '.join(pending.targeted) or 'none named')}",
    ]
    if pending.dataset_id:
        fields.append(f"*Dataset*\n`{escape(pending.dataset_id)}`")
    if pending.job_id:
        fields.append(f"*Training job*\n`{escape(pending.job_id)}`")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": escape(pending.summary)[:MAX_TEXT]}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
    ]
    rates = _rates(pending)
    if rates:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Problem rates, before → after*\n{rates}"[:MAX_TEXT]}})
    if pending.canary is not None:
        # the sequential test's decision and its numbers: what real traffic said before anyone is asked
        canary = f"*Canary: {escape(pending.canary.decision.replace('_', ' '))}*\n{escape(pending.canary.sentence())}"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": canary[:MAX_TEXT]}})
    if pending.gate_reasons:
        checks = "\n".join(f"• {escape(r)}" for r in pending.gate_reasons[:5])
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Gate checks*\n{checks}"[:MAX_TEXT]}})
    blocks.append(
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": (
                        f"Report: {report_link(settings, pending)} · hash `{pending.report_hash[:12]}` · run `{escape(pending.run_id)}`"
                    )[:MAX_TEXT],
                }
            ],
        }
    )
    if outcome is not None:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": outcome[:MAX_TEXT]}})
        return blocks
    value = ApprovalRef.of(pending).value()
    blocks.append(
        {
            "type": "actions",
            "block_id": ACTIONS_BLOCK,
            "elements": [
                {
                    "type": "button",
                    "action_id": ACTION_APPROVE,
                    "style": "primary",
                    "value": value,
                    "text": {"type": "plain_text", "text": "Approve"},
                    "confirm": {
                        "title": {"type": "plain_text", "text": f"Promote {pending.version[:60]}?"},
                        "text": {"type": "mrkdwn", "text": f"{escape(pending.version)} becomes the champion and serves all traffic."},
                        "confirm": {"type": "plain_text", "text": "Approve"},
                        "deny": {"type": "plain_text", "text": "Cancel"},
                    },
                },
                {
                    "type": "button",
                    "action_id": ACTION_REJECT,
                    "style": "danger",
                    "value": value,
                    "text": {"type": "plain_text", "text": "Reject"},
                },
            ],
        }
    )
    return blocks


def reject_dialog(ref: ApprovalRef, where: MessageRef | None) -> dict[str, Any]:
    """The modal that asks why (a rejection needs a reason); it carries the request it answers."""
    meta = {"ref": ref.model_dump(), "where": where.model_dump() if where else None}
    return {
        "type": "modal",
        "callback_id": VIEW_REJECT,
        "private_metadata": json.dumps(meta, separators=(",", ":")),
        "title": {"type": "plain_text", "text": "Reject candidate"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"Reject *{escape(ref.version)}* (run `{escape(ref.run_id)}`)."
                    " Its samples go back to the pool for the next cycle.",
                },
            },
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "label": {"type": "plain_text", "text": "Why?"},
                "element": {"type": "plain_text_input", "action_id": REASON_INPUT, "multiline": True, "max_length": 2000},
            },
        ],
    }


def parse_dialog(view: dict[str, Any]) -> tuple[ApprovalRef, MessageRef | None, str]:
    """The request, the message and the reason a submitted reject dialog carries."""
    try:
        meta = json.loads(view.get("private_metadata") or "")
        ref = ApprovalRef.model_validate(meta["ref"])
        where = MessageRef.model_validate(meta["where"]) if meta.get("where") else None
    except (ValueError, KeyError, TypeError):
        raise UserInputError("the reject dialog does not carry a flywheel approval") from None
    value = (((view.get("state") or {}).get("values") or {}).get(REASON_BLOCK) or {}).get(REASON_INPUT) or {}
    return ref, where, str(value.get("value") or "").strip()
