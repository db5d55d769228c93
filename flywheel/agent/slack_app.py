"""The slack_bolt App for approvals in Slack: Approve/Reject clicks, the reject dialog, @-mentions.

`build_app` runs with process_before_response=True and lazy listeners, in both modes: the ack function
answers Slack at once (within its 3 seconds) and claims the request, then the lazy function does the
slow part (the decision resumes the graph to its promotion) on Bolt's worker threads, off the request
thread. The work itself is flywheel.agent.slack's `SlackApprovals`; running the app (HTTP mode's server,
Socket Mode's handler) is flywheel.agent.slack_server.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flywheel.agent.slack import REQUEST_KIND, SlackApprovals, SlackTokens, _api_error, claim, request_key
from flywheel.agent.slack_blocks import ACTION_APPROVE, ACTION_REJECT, VIEW_REJECT, ApprovalRef, MessageRef, parse_dialog, reject_dialog
from flywheel.errors import InfrastructureError, UserInputError

log = logging.getLogger("flywheel.slack")  # flywheel.agent.slack filters Bolt's token warning out of it


def _where(body: dict[str, Any]) -> MessageRef | None:
    container = body.get("container") or {}
    channel = container.get("channel_id") or (body.get("channel") or {}).get("id")
    ts = container.get("message_ts") or (body.get("message") or {}).get("ts")
    return MessageRef(channel=channel, ts=ts) if channel and ts else None


def build_app(approvals: SlackApprovals, tokens: SlackTokens, mode: str, executor: ThreadPoolExecutor | None = None) -> Any:
    """The Bolt App for `mode` ("http": requests are signature-checked; "socket": the websocket is the
    authentication). Raises InfrastructureError when Slack refuses the bot token (auth.test)."""
    from slack_bolt import App
    from slack_bolt.error import BoltError

    try:
        app = App(
            name="flywheel",
            client=approvals.client,
            signing_secret=tokens.signing_secret if mode == "http" else "",
            request_verification_enabled=(mode == "http"),
            process_before_response=True,  # the ack function answers; lazy functions do the rest
            listener_executor=executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="slack-worker"),
            logger=log,
        )
    except BoltError as exc:
        raise InfrastructureError(f"Slack refused the bot token (auth.test): {exc}") from exc
    except Exception as exc:  # auth.test could not reach Slack (urllib's errors): one line
        raise _api_error("auth.test", exc, getattr(approvals.client, "base_url", "")) from exc

    def ack_click(ack: Any, body: dict[str, Any], context: Any) -> None:
        ack()
        action = (body.get("actions") or [{}])[0]
        user = (body.get("user") or {}).get("id", "")
        where = _where(body)
        key = request_key("action", action.get("action_ts"), user, action.get("action_id"), where.ts if where else "")
        if not claim(approvals.ctx, key, REQUEST_KIND, {"user": user, "action": action.get("action_id")}):
            context["flywheel_repeat"] = True  # Slack's retry, or the same payload again: done already
            return
        if action.get("action_id") != ACTION_REJECT:
            return
        try:  # the dialog must open now: a trigger id expires three seconds after the click
            ref = ApprovalRef.parse(action.get("value"))
            if approvals.refusal(user, ref) is None:
                approvals.client.views_open(trigger_id=body["trigger_id"], view=reject_dialog(ref, where))
                context["flywheel_dialog"] = True
        except Exception as exc:
            log.warning("could not open the reject dialog: %s", exc)

    def work_click(body: dict[str, Any], context: Any) -> None:
        if context.get("flywheel_repeat") or context.get("flywheel_dialog"):
            return
        action = (body.get("actions") or [{}])[0]
        user, where = (body.get("user") or {}).get("id", ""), _where(body)
        try:
            ref = ApprovalRef.parse(action.get("value"))
        except UserInputError as exc:
            approvals.tell(user, where, str(exc))
            return
        if action.get("action_id") == ACTION_APPROVE:
            approvals.decide(user, "approved", ref, "approved in Slack", where)
        else:
            approvals.tell(user, where, approvals.refusal(user, ref) or "The reject dialog could not be opened; try again.")

    def ack_reason(ack: Any, body: dict[str, Any], view: dict[str, Any], context: Any) -> None:
        try:
            _ref, _where_, reason = parse_dialog(view)
        except UserInputError as exc:
            ack(response_action="errors", errors={"reason": str(exc)})
            context["flywheel_repeat"] = True
            return
        if not reason:
            ack(response_action="errors", errors={"reason": "Say why it is rejected."})
            context["flywheel_repeat"] = True
            return
        ack()
        user = (body.get("user") or {}).get("id", "")
        if not claim(
            approvals.ctx, request_key("view", view.get("id"), view.get("hash")), REQUEST_KIND, {"user": user, "view": VIEW_REJECT}
        ):
            context["flywheel_repeat"] = True

    def work_reason(body: dict[str, Any], view: dict[str, Any], context: Any) -> None:
        if context.get("flywheel_repeat"):
            return
        ref, where, reason = parse_dialog(view)
        approvals.decide((body.get("user") or {}).get("id", ""), "rejected", ref, reason, where)

    def ack_event(ack: Any, body: dict[str, Any], context: Any) -> None:
        ack()
        if not claim(approvals.ctx, request_key("event", body.get("event_id")), REQUEST_KIND, {"event": "app_mention"}):
            context["flywheel_repeat"] = True

    def work_mention(event: dict[str, Any], context: Any) -> None:
        if context.get("flywheel_repeat"):
            return
        try:
            approvals.client.chat_postMessage(
                channel=event["channel"], thread_ts=event.get("thread_ts") or event["ts"], text=approvals.pending_summary()
            )
        except Exception as exc:
            log.warning("%s", _api_error("chat.postMessage", exc))

    app.action(ACTION_APPROVE)(ack=ack_click, lazy=[work_click])
    app.action(ACTION_REJECT)(ack=ack_click, lazy=[work_click])
    app.view(VIEW_REJECT)(ack=ack_reason, lazy=[work_reason])
    app.event("app_mention")(ack=ack_event, lazy=[work_mention])
    return app
