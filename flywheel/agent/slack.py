"""Approvals in Slack: post a request when a run waits for a decision, take Approve/Reject clicks, resume
the run, and close the message with the outcome.

Pieces, top to bottom:
- `SlackTokens`: read from the environment only (SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_SIGNING_SECRET).
- `web_client(settings, token)`: slack_sdk's WebClient on `slack.api_url` (tests point it at a local
  stand-in). It does not retry a failed connection by itself: a chat.postMessage whose answer was lost
  may have been posted, and a blind retry would post twice. Rate limits are retried (nothing was posted).
  Its failures become one line (`_api_error`): a refusal about the token, a scope or the channel is a
  UserInputError saying what to fix; any other failure is an InfrastructureError.
- `send_test_message`: `flywheel slack test`, one message to the channel.
- `SlackApprovals`: the work, with no Bolt in it. `post` is idempotent (table `effects`, keyed by run id +
  version + report hash; a request whose post was cut off is found again by its message metadata in the
  channel's history, so a resume after a crash never posts twice). `decide` applies a click through
  flywheel.agent.runner.decide and updates the message; `sync` posts what waits and closes what was
  decided elsewhere (`flywheel approve` in a terminal).
- `build_app` (flywheel.agent.slack_app): the slack_bolt App. It runs with process_before_response=True
  and lazy listeners, in both modes: the ack function answers Slack at once (within its 3 seconds) and
  claims the request, then the lazy function does the slow part (the decision resumes the graph to its
  promotion) on Bolt's worker threads, off the request thread. Refused: a bad or missing signature and a
  timestamp older than five minutes (Bolt's RequestVerification, HTTP mode), a user not in
  approvals.slack_approvers, a click on a decided request ("already decided by X", to that user only),
  and Slack's retries (X-Slack-Retry-Num) or repeats of the same payload: every request is claimed in
  `effects` by what identifies it (event id, action timestamp, view id), and a second claim is a no-op.
Running the app (HTTP mode's server, Socket Mode's handler) is in flywheel.agent.slack_server.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flywheel.agent import runs
from flywheel.agent.slack_blocks import EVENT_TYPE, ApprovalRef, MessageRef, approval_blocks, escape, fallback_text, mention
from flywheel.context import Context
from flywheel.errors import FlywheelError, InfrastructureError, NotFoundError, PolicyViolation, SettingsError, UserInputError
from flywheel.records import stable_hash
from flywheel.release.decisions import DecisionOutcome, PendingApproval
from flywheel.release.records import DecisionKind
from flywheel.settings import Settings
from flywheel.store import runs as run_repo

log = logging.getLogger("flywheel.slack")
# Bolt reads SLACK_BOT_TOKEN itself and warns, at every build_app, that the client passed to it wins:
# the client holds that same token, so the warning only adds a misleading line to each daemon retry.
log.addFilter(lambda record: "`token` will be unused" not in record.getMessage())

POST_KIND, REQUEST_KIND = "slack_approval", "slack_request"
POSTING, POSTED, CLOSED = "posting", "posted", "closed"


# --- tokens and the client ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlackTokens:
    bot_token: str
    app_token: str
    signing_secret: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SlackTokens:
        env = os.environ if environ is None else environ
        return cls(env.get("SLACK_BOT_TOKEN", ""), env.get("SLACK_APP_TOKEN", ""), env.get("SLACK_SIGNING_SECRET", ""))

    def require(self, mode: str) -> SlackTokens:
        """Refuse to start a mode whose tokens are missing, naming the variable to set."""
        if not self.bot_token:
            raise SettingsError("slack.mode", f"{mode} mode needs SLACK_BOT_TOKEN (an xoxb- token) in the environment")
        if mode == "socket" and not self.app_token:
            raise SettingsError(
                "slack.mode", "socket mode needs SLACK_APP_TOKEN (an xapp- token with connections:write) in the environment"
            )
        if mode == "http" and not self.signing_secret:
            raise SettingsError("slack.mode", "http mode needs SLACK_SIGNING_SECRET in the environment")
        return self


def web_client(settings: Settings, token: str) -> Any:
    from slack_sdk import WebClient
    from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

    base_url = settings.slack.api_url or WebClient.BASE_URL
    return WebClient(
        token=token, base_url=base_url.rstrip("/") + "/", timeout=15, retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=2)]
    )


_BAD_TOKEN = "SLACK_BOT_TOKEN was refused: use the app's Bot User OAuth Token (xoxb-...) of this workspace"
# Slack answered, and the answer is about the token, its scopes or the channel: the user fixes a setting
# (exit status 2). Any other failure is an InfrastructureError (exit status 4), retried by the daemon.
_REFUSALS = {
    "invalid_auth": _BAD_TOKEN,
    "not_authed": _BAD_TOKEN,
    "account_inactive": "the app's token belongs to a deactivated user or workspace; reinstall the app",
    "token_revoked": "SLACK_BOT_TOKEN was revoked; reinstall the app and use its new token",
    "token_expired": "SLACK_BOT_TOKEN expired; turn off token rotation or use a fresh token",
    "not_allowed_token_type": "SLACK_BOT_TOKEN must be the bot token (xoxb-...), not an app-level or user token",
    "missing_scope": "the bot token lacks a scope; add the scopes of docs/slack.md and reinstall the app",
    "channel_not_found": "no such channel visible to the bot: check slack.channel and invite the bot to the channel",
    "not_in_channel": "the bot is not a member of slack.channel: invite it there (/invite @flywheel)",
    "is_archived": "slack.channel is archived: set a live channel",
}


def _cause(exc: BaseException) -> str:
    """What went wrong on the way to Slack, in a few words (`Connection refused`, `timed out`)."""
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket's error
    inner = reason if isinstance(reason, BaseException) else exc
    text = getattr(inner, "strerror", None) or str(reason if isinstance(reason, str) else inner).strip()
    return text.splitlines()[0] if text else type(inner).__name__


def _api_error(what: str, exc: Exception, url: str = "") -> FlywheelError:
    """One line: Slack's error code when it answered (`channel_not_found`, with what to do about a
    refusal), else why it could not be reached."""
    response = getattr(exc, "response", None)
    code = response.get("error") if response is not None and hasattr(response, "get") else None
    if code in _REFUSALS:
        assert response is not None  # the code came from it
        needed = response.get("needed") if code == "missing_scope" else None
        return UserInputError(f"Slack refused {what}: {code}{f' (needs {needed})' if needed else ''}: {_REFUSALS[code]}")
    if code:
        return InfrastructureError(f"Slack {what} failed: {code}")
    where = f" at {url}" if url else ""
    return InfrastructureError(f"Slack {what} failed: cannot reach Slack{where}: {_cause(exc)}")


def send_test_message(settings: Settings, tokens: SlackTokens) -> str:
    """Post one plain message to `slack.channel`: proves the token, the channel and the bot's place in
    it before any approval depends on them. Returns the line `flywheel slack test` prints."""
    if not tokens.bot_token:
        raise UserInputError("SLACK_BOT_TOKEN is not set: export the app's Bot User OAuth Token (xoxb-...), see docs/slack.md")
    channel = settings.slack.channel
    if not channel:
        raise SettingsError("slack.channel", "set the channel approval requests go to (a name like #approvals, or an id)")
    client = web_client(settings, tokens.bot_token)
    try:
        who = client.auth_test()
    except Exception as exc:  # slack_sdk and urllib raise their own types; the user sees one line
        raise _api_error("auth.test", exc, client.base_url) from exc
    text = f"flywheel test message from project {settings.project_dir.name}: approval requests will be posted here."
    try:
        answer = client.chat_postMessage(channel=channel, text=text, unfurl_links=False)
    except Exception as exc:
        raise _api_error("chat.postMessage", exc, client.base_url) from exc
    return (
        f"ok: posted to {channel} (channel {answer['channel']}, message {answer['ts']}) as {who.get('user')} "
        f"in {who.get('team')}; slack.mode is {settings.slack.mode}"
    )


# --- table `effects`: claims and posted requests ----------------------------------------------------------------


def claim(ctx: Context, key: str, kind: str, result: dict[str, Any]) -> bool:
    """Insert `key` unless it is there. True: this caller holds it now; False: someone did it before."""
    return runs.record_effect(ctx.store, key, kind, result)


def _effect(ctx: Context, key: str) -> tuple[dict[str, Any], datetime] | None:
    found = run_repo.get_effect(ctx.store, key)
    return (found.result, found.created_at) if found else None


def _set_effect(ctx: Context, key: str, result: dict[str, Any]) -> None:
    run_repo.set_effect_result(ctx.store, key, result)


def approval_key(pending: PendingApproval | ApprovalRef) -> str:
    return f"slack:approval:{pending.run_id}:{pending.version}:{pending.report_hash[:16]}"


def request_key(*parts: Any) -> str:
    return "slack:request:" + stable_hash([str(p) for p in parts], 32)


class PostedApproval(MessageRef):
    key: str
    replayed: bool = False  # it had been posted before: nothing was posted now


# --- the work ---------------------------------------------------------------------------------------------------


class SlackApprovals:
    """Posting, deciding and closing approval requests in `settings.slack.channel` through `client`."""

    def __init__(self, ctx: Context, client: Any):
        if not ctx.settings.slack.channel:
            raise SettingsError("slack.channel", "set the channel approval requests go to (a name like #approvals, or an id)")
        self.ctx, self.client, self.settings = ctx, client, ctx.settings
        ctx.store  # noqa: B018 - open the store here, not first on two worker threads at once
        self._lock = threading.RLock()  # one decision or post at a time in this process
        self._channel_ids: dict[str, str] = {}

    # --- posting ---------------------------------------------------------------------------------------------
    def post(self, pending: PendingApproval) -> PostedApproval:
        """Post the request once. A second call, after a crash or from a second path, returns the first post."""
        key = approval_key(pending)
        with self._lock:
            record: dict[str, Any] = {"state": POSTING, "channel": self.settings.slack.channel, "pending": pending.model_dump(mode="json")}
            found = None if claim(self.ctx, key, POST_KIND, record) else _effect(self.ctx, key)
            if found is not None:  # claimed before (rows in `effects` are never deleted)
                record, claimed_at = found
                if record.get("ts"):
                    return PostedApproval(key=key, channel=record["channel"], ts=record["ts"], replayed=True)
                # A post was started and never recorded: it may have reached Slack. Look before posting.
                channel = self._channel_id(record.get("channel") or self.settings.slack.channel)
                ts = self._find_posted(channel, key, claimed_at)
                if ts is not None:
                    _set_effect(self.ctx, key, {**record, "state": POSTED, "channel": channel, "ts": ts})
                    return PostedApproval(key=key, channel=channel, ts=ts, replayed=True)
            try:
                answer = self.client.chat_postMessage(
                    channel=record.get("channel") or self.settings.slack.channel,
                    text=fallback_text(pending),
                    blocks=approval_blocks(self.settings, pending),
                    unfurl_links=False,
                    metadata={
                        "event_type": EVENT_TYPE,
                        "event_payload": {"key": key, "run_id": pending.run_id, "version": pending.version},
                    },
                )
            except Exception as exc:  # any client failure leaves the claim for the recovery above
                raise _api_error("chat.postMessage", exc) from exc
            _set_effect(self.ctx, key, {**record, "state": POSTED, "channel": answer["channel"], "ts": answer["ts"]})
            log.info("posted the approval request for %s (run %s) to %s", pending.version, pending.run_id, answer["channel"])
            return PostedApproval(key=key, channel=answer["channel"], ts=answer["ts"])

    def _channel_id(self, channel: str) -> str:
        """conversations.history wants an id; the setting may be a name."""
        if channel[:1] in "CGD" and channel[1:].isalnum() and channel.upper() == channel:
            return channel
        if channel not in self._channel_ids:
            name, cursor = channel.lstrip("#"), None
            while True:
                try:
                    page = self.client.conversations_list(
                        types="public_channel,private_channel", limit=200, cursor=cursor, exclude_archived=True
                    )
                except Exception as exc:
                    raise _api_error("conversations.list", exc) from exc
                for item in page.get("channels", []):
                    self._channel_ids[item["name"]] = item["id"]
                cursor = (page.get("response_metadata") or {}).get("next_cursor")
                if name in self._channel_ids or not cursor:
                    break
            if name not in self._channel_ids:
                raise SettingsError("slack.channel", f"no channel named {channel!r} is visible to the bot; invite it or use the channel id")
            self._channel_ids[channel] = self._channel_ids[name]
        return self._channel_ids[channel]

    def _find_posted(self, channel: str, key: str, since: datetime) -> str | None:
        if since.tzinfo is None:  # SQLite hands back the stored UTC time without its zone
            since = since.replace(tzinfo=UTC)
        oldest = (since - timedelta(minutes=2)).timestamp()  # the claim precedes the post; allow for clock skew
        cursor = None
        for _page in range(10):
            try:
                page = self.client.conversations_history(
                    channel=channel, oldest=f"{oldest:.6f}", limit=200, include_all_metadata=True, cursor=cursor
                )
            except Exception as exc:
                raise _api_error("conversations.history", exc) from exc
            for message in page.get("messages", []):
                meta = message.get("metadata") or {}
                if meta.get("event_type") == EVENT_TYPE and (meta.get("event_payload") or {}).get("key") == key:
                    return message["ts"]
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                return None
        return None

    # --- answering -------------------------------------------------------------------------------------------
    def decided(self, ref: ApprovalRef) -> str | None:
        """'approved by <@U1> (slack)' when someone decided this version's report already; else None."""
        from flywheel.release.approvals import approvals_for

        for row in approvals_for(self.ctx.store, ref.version):
            if row.report_hash == ref.report_hash:
                return f"{row.decision} by {mention(row.approver, row.channel)} ({row.channel})"
        return None

    def refusal(self, user: str, ref: ApprovalRef) -> str | None:
        """Why `user` may not answer this request now (None: they may)."""
        from flywheel.agent.runner import pending_approvals

        earlier = self.decided(ref)
        if earlier:
            return f"Already decided: {ref.version} was {earlier}. Nothing changed."
        if user not in self.settings.approvals.slack_approvers:
            return "You are not on the approver list (approvals.slack_approvers); nothing was decided."
        waiting = next((p for p in pending_approvals(self.ctx) if p.run_id == ref.run_id), None)
        if waiting is None:
            return f"Run {ref.run_id} no longer waits for a decision (see `flywheel runs`); nothing was decided."
        if waiting.version != ref.version or waiting.report_hash != ref.report_hash:
            return (
                f"This request is outdated: run {ref.run_id} now waits on {waiting.version} with report "
                f"{waiting.report_hash[:12]}; answer the newer request."
            )
        return None

    def decide(self, user: str, decision: DecisionKind, ref: ApprovalRef, reason: str, where: MessageRef | None) -> str:
        """Apply a click: refuse (ephemeral, to `user` only) or decide, resume the run, close the message.
        Returns what happened, in a sentence."""
        from flywheel.agent.runner import decide

        with self._lock:
            problem = self.refusal(user, ref)
            if problem:
                self.tell(user, where, problem)
                return problem
            try:
                outcome = decide(self.ctx, ref.run_id, decision, user, reason, "slack")
            except (PolicyViolation, UserInputError) as exc:  # a race lost to another way in, or a changed report
                earlier = self.decided(ref)
                text = f"Already decided: {ref.version} was {earlier}. Nothing changed." if earlier else f"Nothing was decided: {exc}"
                self.tell(user, where, text)
                return text
            except FlywheelError as exc:
                text = f"The decision could not be applied: {exc}"
                self.tell(user, where, text)
                return text
            if outcome.state == "waiting_approval":  # the promotion node refused it; the run asks again
                text = f"Not applied: {(outcome.pending.refused if outcome.pending else None) or outcome.message}"
                self.tell(user, where, text)
                return text
            text = _outcome_text(outcome.outcome, outcome.message, outcome.state, outcome.error, ref.run_id)
            self.close(ref, text, where)
            return text

    def tell(self, user: str, where: MessageRef | None, text: str) -> None:
        if where is None:
            log.info("to %s: %s", user, text)
            return
        try:
            self.client.chat_postEphemeral(channel=where.channel, user=user, text=text)
        except Exception as exc:
            log.warning("could not tell %s: %s", user, _api_error("chat.postEphemeral", exc))

    def close(self, ref: ApprovalRef, text: str, where: MessageRef | None = None) -> None:
        """Replace the buttons with the outcome (chat.update) and mark the request closed."""
        key = approval_key(ref)
        found = _effect(self.ctx, key)
        record = found[0] if found else {}
        target = MessageRef(channel=record["channel"], ts=record["ts"]) if record.get("ts") else where
        if target is None:
            return
        pending = PendingApproval.model_validate(record["pending"]) if record.get("pending") else None
        try:
            if pending is not None:
                self.client.chat_update(
                    channel=target.channel,
                    ts=target.ts,
                    text=f"{ref.version}: {_plain(text)}",
                    blocks=approval_blocks(self.settings, pending, outcome=text),
                )
            else:
                self.client.chat_update(
                    channel=target.channel,
                    ts=target.ts,
                    text=f"{ref.version}: {_plain(text)}",
                    blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
                )
        except Exception as exc:
            raise _api_error("chat.update", exc) from exc
        if found:
            _set_effect(self.ctx, key, {**record, "state": CLOSED, "outcome": text})

    def sync(self) -> dict[str, int]:
        """Post every approval some run waits for; close requests that were answered another way."""
        from flywheel.agent.runner import get_run, pending_approvals

        posted = closed = 0
        with self._lock:
            for pending in pending_approvals(self.ctx):
                posted += 0 if self.post(pending).replayed else 1
            for row in run_repo.effects_of_kind(self.ctx.store, POST_KIND):
                record = dict(row.result)
                if record.get("state") != POSTED or not record.get("pending"):
                    continue
                ref = ApprovalRef.of(PendingApproval.model_validate(record["pending"]))
                try:
                    run = get_run(self.ctx, ref.run_id)
                except NotFoundError:
                    self.close(ref, f"No longer pending: run {escape(ref.run_id)} is gone.")
                    closed += 1
                    continue
                if run.state in ("running", "waiting_approval"):
                    continue  # being decided right now, or still open
                earlier = self.decided(ref)
                outcome = run.summary.get("outcome")
                text = (
                    _outcome_text(outcome, "", run.state, run.error, ref.run_id)
                    if outcome
                    else f"{ref.version} was {earlier}."
                    if earlier
                    else f"No longer pending: run {escape(ref.run_id)} is {run.state}."
                )
                self.close(ref, text)
                closed += 1
        return {"posted": posted, "closed": closed}

    def pending_summary(self) -> str:
        from flywheel.agent.runner import pending_approvals

        waiting = pending_approvals(self.ctx)
        if not waiting:
            return "No approvals pending."
        return "\n".join(f"• *{escape(p.version)}* (run `{escape(p.run_id)}`): {escape(p.summary)}" for p in waiting)


def _plain(text: str) -> str:
    return text.replace("*", "")


def _outcome_text(outcome: dict[str, Any] | None, message: str, state: str, error: str | None, run_id: str) -> str:
    if outcome:
        done = DecisionOutcome.model_validate(outcome)
        sentence = escape(done.sentence())
        if done.channel == "slack":
            sentence = sentence.replace(f"by {escape(done.approver)}", f"by {mention(done.approver, 'slack')}")
        icon = ":white_check_mark:" if done.promoted else ":x:" if done.decision == "rejected" else ":warning:"
        text = f"{icon} {sentence}"
    else:
        text = escape(message or f"run {run_id} is {state}")
    if state == "failed":
        text += f"\n:warning: the run stopped: {escape(error or '')} (`flywheel resume {escape(run_id)}`)"
    return text
