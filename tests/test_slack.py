"""Approvals in Slack, offline: the real slack_sdk WebClient against tests/slack_api_server.py (a local
stand-in for the Web API and the Socket Mode websocket), the real Bolt app served over real HTTP
(Starlette + uvicorn on loopback) or Socket Mode, requests signed with slack_sdk's SignatureVerifier,
and a real pending approval: a full heuristic cycle (triage, judge, correct, train a tiny model,
evaluate) run once per module and copied for each test."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from agent_helpers import seed_project
from slack_api_server import SlackApiServer
from slack_bolt.request import BoltRequest
from slack_sdk.signature import SignatureVerifier
from sqlalchemy import select

from flywheel.agent import runs
from flywheel.agent.runner import decide, pending_approvals, start_run
from flywheel.agent.schedule import Daemon
from flywheel.agent.slack import SlackApprovals, SlackTokens, approval_key, web_client
from flywheel.agent.slack_app import build_app
from flywheel.agent.slack_blocks import ACTION_APPROVE, ACTION_REJECT, VIEW_REJECT, ApprovalRef, report_link
from flywheel.agent.slack_server import SlackHttpServer, socket_mode_handler
from flywheel.cli import main
from flywheel.context import Context
from flywheel.errors import InfrastructureError, SettingsError
from flywheel.records import utcnow
from flywheel.release import registry
from flywheel.release.decisions import PendingApproval
from flywheel.settings import load_settings
from flywheel.store.schema import approvals, effects

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TOKENS = SlackTokens(bot_token="xoxb-test-token", app_token="xapp-test-token", signing_secret=SECRET)
ALICE, BOB, MALLORY = "U0ALICE", "U0BOB", "U0MALLORY"


# --- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture
def slack() -> Iterator[SlackApiServer]:
    with SlackApiServer(bot_token=TOKENS.bot_token, app_token=TOKENS.app_token, socket_mode=True) as server:
        yield server


def _settings(project: Path, server: SlackApiServer, store_url: str | None = None, **extra: Any) -> Any:
    overrides: dict[str, Any] = {
        "slack": {"mode": "http", "channel": "#approvals", "api_url": server.api_url, "sync_interval_s": 0.2, **extra.pop("slack", {})},
        "approvals": {"slack_approvers": [ALICE, BOB]},
        **extra,
    }
    if store_url:
        overrides["store"] = {"url": store_url}
    return load_settings(project, **overrides)


@pytest.fixture(scope="module")
def waiting_project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A project whose heuristic cycle trained and evaluated v2 and waits for its approval. It trains a
    model: the tests that use it are marked slow."""
    root = tmp_path_factory.mktemp("slack-template")
    project = root / "project"
    project.mkdir()
    seed_project(project, tiny_model_dir)
    ctx = Context(settings=load_settings(project))
    try:
        outcome = start_run(ctx, "run", "heuristic")
        assert outcome.state == "waiting_approval" and outcome.pending is not None, outcome
        assert outcome.pending.version == "v2"
    finally:
        ctx.close()
    return project


@pytest.fixture
def waiting(waiting_project: Path, tmp_path: Path, slack: SlackApiServer) -> Iterator[Context]:
    """A copy of the waiting project (its own store, checkpoints and index), pointed at the local Slack."""
    project = tmp_path / "copy"
    shutil.copytree(waiting_project, project)
    ctx = Context(settings=_settings(project, slack))
    yield ctx
    ctx.close()


def _pending(run_id: str = "run-test0001", version: str = "v7", report_hash: str = "ab" * 32) -> PendingApproval:
    """An approval payload for posting tests (the deciding tests use a real one)."""
    return PendingApproval(
        run_id=run_id,
        version=version,
        report_hash=report_hash,
        report_json="/srv/reports/v7/report.json",
        report_html="/srv/reports/v7/report.html",
        champion="v6",
        gate_passed=True,
        gate_reasons=["targeted over_promise fell from 40.0% to 0.0%"],
        targeted=["over_promise"],
        primary_set="problem",
        task_success_before=0.5,
        task_success_after=0.75,
        problem_rates_before={"over_promise": 0.4, "<!channel>": 0.1},
        problem_rates_after={"over_promise": 0.0, "<!channel>": 0.1},
        summary="v7 passed its promotion gate against v6.",
        requested_at=utcnow(),
    )


# --- signed requests ------------------------------------------------------------------------------------------------


def _post(
    url: str,
    body: str,
    *,
    secret: str | None = SECRET,
    age_s: int = 0,
    headers: dict[str, str] | None = None,
    content_type: str = "application/x-www-form-urlencoded",
) -> httpx.Response:
    sent = {"Content-Type": content_type}
    if secret is not None:
        timestamp = str(int(time.time()) - age_s)
        sent["X-Slack-Request-Timestamp"] = timestamp
        sent["X-Slack-Signature"] = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body) or ""
    sent.update(headers or {})
    return httpx.post(url, content=body.encode(), headers=sent, timeout=10)


def _click_payload(action_id: str, ref: ApprovalRef, user: str, where: tuple[str, str], action_ts: str) -> dict[str, Any]:
    channel, ts = where
    return {
        "type": "block_actions",
        "api_app_id": "A0FLY",
        "token": "legacy",
        "trigger_id": f"trig-{action_ts}",
        "user": {"id": user, "username": user.lower(), "team_id": "T0TEAM"},
        "team": {"id": "T0TEAM", "domain": "flywheel-test"},
        "container": {"type": "message", "message_ts": ts, "channel_id": channel, "is_ephemeral": False},
        "channel": {"id": channel, "name": "approvals"},
        "message": {"ts": ts, "type": "message"},
        "response_url": "https://hooks.slack.com/actions/T0TEAM/1/x",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "flywheel_approval",
                "value": ref.value(),
                "action_ts": action_ts,
                "text": {"type": "plain_text", "text": "x"},
            }
        ],
    }


def _form(payload: dict[str, Any]) -> str:
    return urlencode({"payload": json.dumps(payload)})


def _view_payload(view: dict[str, Any], user: str, reason: str) -> dict[str, Any]:
    submitted = {**view, "state": {"values": {"reason": {"reason_input": {"type": "plain_text_input", "value": reason}}}}}
    return {
        "type": "view_submission",
        "team": {"id": "T0TEAM"},
        "user": {"id": user, "team_id": "T0TEAM"},
        "api_app_id": "A0FLY",
        "trigger_id": "trig-view",
        "view": submitted,
    }


def _count(ctx: Context, table: Any, *where: Any) -> int:
    with ctx.store.engine.connect() as conn:
        return len(conn.execute(select(table).where(*where)).fetchall())


@pytest.fixture
def lazy_work() -> Iterator[ThreadPoolExecutor]:
    """Bolt's lazy listeners on one thread, in arrival order (build_app's `executor`). Bolt queues a request's
    lazy function before it answers the request, so once `_settled` returns, the lazy work of every request
    answered before has run to its end: what it did not do by then, it will not do."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slack-worker")
    yield executor
    executor.shutdown(wait=True)


def _settled(lazy_work: ThreadPoolExecutor) -> None:
    lazy_work.submit(lambda: None).result(timeout=120)


@pytest.fixture
def http_app(waiting: Context, slack: SlackApiServer, lazy_work: ThreadPoolExecutor) -> Iterator[tuple[SlackApprovals, SlackHttpServer]]:
    approvals_ = SlackApprovals(waiting, web_client(waiting.settings, TOKENS.bot_token))
    server = SlackHttpServer(build_app(approvals_, TOKENS, "http", executor=lazy_work), SECRET, "127.0.0.1", 0).start()
    yield approvals_, server
    server.stop()


# --- tokens, settings, the message ------------------------------------------------------------------------------------


def test_each_mode_names_the_token_it_misses(project: Path, slack: SlackApiServer) -> None:
    with pytest.raises(SettingsError, match="SLACK_BOT_TOKEN"):
        SlackTokens.from_env({}).require("http")
    with pytest.raises(SettingsError, match="SLACK_SIGNING_SECRET"):
        SlackTokens.from_env({"SLACK_BOT_TOKEN": "xoxb-1"}).require("http")
    with pytest.raises(SettingsError, match="SLACK_APP_TOKEN"):
        SlackTokens.from_env({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s"}).require("socket")
    assert SlackTokens.from_env({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"}).require("socket").app_token == "xapp-1"
    ctx = Context(settings=_settings(project, slack, slack={"channel": ""}))
    with pytest.raises(SettingsError, match="slack.channel"):
        SlackApprovals(ctx, web_client(ctx.settings, TOKENS.bot_token))
    ctx.close()
    # a bot token Slack refuses stops the app at start (Bolt's auth.test), with a clear error
    ctx = Context(settings=_settings(project, slack))
    bad = SlackApprovals(ctx, web_client(ctx.settings, "xoxb-wrong"))
    with pytest.raises(InfrastructureError, match="refused the bot token"):
        build_app(bad, TOKENS, "http")
    ctx.close()


def test_posting_is_idempotent_and_survives_a_lost_answer(any_store: Any, slack: SlackApiServer, project: Path) -> None:
    store_url = any_store.settings.store.url or None
    ctx = Context(settings=_settings(project, slack, store_url, slack={"report_url": "https://reports.example.com/a"}))
    try:
        poster = SlackApprovals(ctx, web_client(ctx.settings, TOKENS.bot_token))
        first = poster.post(_pending())
        assert not first.replayed and first.channel == "C0APPROVALS"
        [message] = slack.messages()
        assert message["ts"] == first.ts and "v7 waits for approval" in message["text"]
        blocks = message["blocks"]
        assert blocks[0]["text"]["text"] == "Approval needed: v7"
        fields = " ".join(f["text"] for f in blocks[2]["fields"])
        assert "50.0% → 75.0%" in fields and "over_promise" in fields and "v6" in fields
        assert "&lt;!channel&gt;" in json.dumps(blocks) and "<!channel>" not in json.dumps(blocks)  # store text never pings
        assert "`/srv/reports/v7/report.html`" in json.dumps(blocks)  # outside the artifacts folder: shown as a path
        inside = _pending().model_copy(update={"report_html": str(ctx.settings.artifacts_path / "evals" / "v7" / "report.html")})
        assert report_link(ctx.settings, inside) == "<https://reports.example.com/a/evals/v7/report.html|open the report>"
        [actions] = [b for b in blocks if b["type"] == "actions"]
        buttons = {e["action_id"]: ApprovalRef.parse(e["value"]) for e in actions["elements"]}
        assert buttons == {
            ACTION_APPROVE: ApprovalRef(run_id="run-test0001", version="v7", report_hash="ab" * 32),
            ACTION_REJECT: ApprovalRef(run_id="run-test0001", version="v7", report_hash="ab" * 32),
        }
        assert message["metadata"]["event_payload"]["key"] == approval_key(_pending())

        again = poster.post(_pending())
        assert again.replayed and again.ts == first.ts and len(slack.messages()) == 1
        # a second process (a resume after a crash) does not post either
        assert SlackApprovals(ctx, web_client(ctx.settings, TOKENS.bot_token)).post(_pending()).replayed

        # Slack takes the message but the answer is lost: the post fails, the next one finds it by metadata
        newer = _pending(run_id="run-test0002", report_hash="cd" * 32)
        slack.accept_then_drop("chat.postMessage")
        with pytest.raises(InfrastructureError, match="chat.postMessage"):
            poster.post(newer)
        assert len(slack.messages()) == 2
        fresh = SlackApprovals(ctx, web_client(ctx.settings, TOKENS.bot_token))
        recovered = fresh.post(newer)
        assert recovered.replayed and recovered.ts == slack.messages()[1]["ts"] and len(slack.messages()) == 2
        assert [c.params["channel"] for c in slack.calls_to("conversations.history")] == ["C0APPROVALS"]
        assert len(slack.calls_to("conversations.list")) == 1  # "#approvals" resolved to its id once
        assert _count(ctx, effects, effects.c.kind == "slack_approval") == 2
    finally:
        ctx.close()


# --- HTTP mode: signatures, clicks, retries ---------------------------------------------------------------------------


@pytest.mark.slow
def test_http_mode_refuses_bad_signatures_and_stale_timestamps(
    http_app: tuple[SlackApprovals, SlackHttpServer], slack: SlackApiServer, waiting: Context, lazy_work: ThreadPoolExecutor
) -> None:
    approvals_, server = http_app
    posted = approvals_.post(pending_approvals(waiting)[0])
    ref = ApprovalRef.of(pending_approvals(waiting)[0])
    body = _form(_click_payload(ACTION_APPROVE, ref, ALICE, (posted.channel, posted.ts), "1700000001.000001"))
    assert _post(server.url, body, secret=None).status_code == 401  # no signature at all
    assert _post(server.url, body, secret="not-the-secret").status_code == 401
    assert _post(server.url, body, age_s=6 * 60).status_code == 401  # older than five minutes
    assert _post(server.url, body, headers={"X-Slack-Signature": "v0=" + "0" * 64}).status_code == 401  # tampered
    assert _post(server.url, body, headers={"X-Slack-Request-Timestamp": "yesterday"}).status_code == 401
    assert _post(server.url, "{not json", secret=None, content_type="application/json").status_code == 401
    assert _post(server.url, "{not json", content_type="application/json").status_code == 400  # signed, malformed
    # Bolt's own check stands behind ours: the same app, dispatched directly, refuses a stale request too
    stale = str(int(time.time()) - 6 * 60)
    bolt_answer = server.app.dispatch(
        BoltRequest(
            body=body,
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "x-slack-request-timestamp": stale,
                "x-slack-signature": SignatureVerifier(SECRET).generate_signature(timestamp=stale, body=body) or "",
            },
        )
    )
    assert bolt_answer.status == 401
    assert httpx.get(server.url.replace("/slack/events", "/healthz")).text == "ok"
    _settled(lazy_work)  # whatever these requests could have started has finished
    assert _count(waiting, approvals) == 0 and slack.calls_to("chat.update") == [] and slack.ephemeral == []
    assert runs.get_run(waiting.store, ref.run_id).state == "waiting_approval"


@pytest.mark.slow
def test_approve_in_slack_acks_first_promotes_once_and_refuses_the_rest(
    http_app: tuple[SlackApprovals, SlackHttpServer],
    slack: SlackApiServer,
    waiting: Context,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    lazy_work: ThreadPoolExecutor,
) -> None:
    approvals_, server = http_app
    assert approvals_.sync() == {"posted": 1, "closed": 0}
    [message] = slack.messages()
    pending = pending_approvals(waiting)[0]
    ref, where = ApprovalRef.of(pending), ("C0APPROVALS", message["ts"])

    # someone not on the approver list: told so, privately; nothing decided
    assert _post(server.url, _form(_click_payload(ACTION_APPROVE, ref, MALLORY, where, "1700000001.000001"))).status_code == 200
    told = slack.wait_for(lambda: slack.ephemeral, what="the refusal")
    assert told[0]["user"] == MALLORY and "not on the approver list" in told[0]["text"]
    assert _count(waiting, approvals) == 0

    # an approver: the answer comes back while the run is still being resumed (held in the promotion node)
    marker = tmp_path / "paused"
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_AT", "promotion")
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_FILE", str(marker))
    monkeypatch.setenv("FLYWHEEL_TEST_PAUSE_SECONDS", "3")
    click = _form(_click_payload(ACTION_APPROVE, ref, ALICE, where, "1700000002.000002"))
    answer = _post(server.url, click)
    assert answer.status_code == 200 and answer.text == ""
    slack.wait_for(marker.exists, what="the promotion node")
    assert runs.get_run(waiting.store, ref.run_id).state == "running" and slack.calls_to("chat.update") == []
    [update] = slack.wait_for(lambda: slack.calls_to("chat.update"), what="the message update")
    assert update.params["ts"] == message["ts"]
    closed = slack.messages()[0]
    outcome_text = json.dumps(closed["blocks"])
    assert "v2 promoted to champion, approved by <@U0ALICE> (slack)" in outcome_text
    assert not any(b["type"] == "actions" for b in closed["blocks"])  # the buttons are gone
    assert registry.current_routing(waiting.store).champion == "v2"
    with waiting.store.engine.connect() as conn:
        row = conn.execute(select(approvals)).one()
    assert (row.version, row.approver, row.channel, row.report_hash) == ("v2", ALICE, "slack", pending.report_hash)
    assert runs.get_run(waiting.store, ref.run_id).state == "done"
    monkeypatch.delenv("FLYWHEEL_TEST_PAUSE_AT")

    # Slack's retry of the same click: acknowledged, nothing else happens
    calls_before, told_before = len(slack.calls), len(slack.ephemeral)
    retry = _post(server.url, click, headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert retry.status_code == 200
    _settled(lazy_work)  # the retry's lazy work has run to its end
    assert len(slack.calls) == calls_before and len(slack.ephemeral) == told_before and _count(waiting, approvals) == 1

    # a second click on the decided request, by another approver: "already decided", to them only
    assert _post(server.url, _form(_click_payload(ACTION_REJECT, ref, BOB, where, "1700000003.000003"))).status_code == 200
    note = slack.wait_for(lambda: [e for e in slack.ephemeral if e["user"] == BOB], what="already decided")
    assert "Already decided: v2 was approved by <@U0ALICE> (slack)" in note[0]["text"]
    assert slack.views == [] and len(slack.messages()) == 1 and _count(waiting, approvals) == 1
    assert len(slack.calls_to("chat.update")) == 1


@pytest.mark.slow
def test_reject_asks_why_in_a_dialog_then_rejects_with_that_reason(
    http_app: tuple[SlackApprovals, SlackHttpServer], slack: SlackApiServer, waiting: Context
) -> None:
    approvals_, server = http_app
    posted = approvals_.post(pending_approvals(waiting)[0])
    ref = ApprovalRef.of(pending_approvals(waiting)[0])
    click = _click_payload(ACTION_REJECT, ref, BOB, (posted.channel, posted.ts), "1700000010.000001")
    assert _post(server.url, _form(click)).status_code == 200
    [opened] = slack.views  # opened before the answer: a trigger id lives three seconds
    assert opened["trigger_id"] == click["trigger_id"] and opened["view"]["callback_id"] == VIEW_REJECT
    assert _count(waiting, approvals) == 0

    empty = _post(server.url, _form(_view_payload(opened["view"], BOB, "   ")))
    assert empty.status_code == 200 and empty.json()["response_action"] == "errors"
    assert _post(server.url, _form(_view_payload(opened["view"], BOB, "tone got worse on refunds"))).status_code == 200
    slack.wait_for(lambda: slack.calls_to("chat.update"), what="the message update")
    text = json.dumps(slack.messages()[0]["blocks"])
    assert "v2 rejected by <@U0BOB>" in text
    assert registry.resolve(waiting.store, "v2").status == "rejected" and registry.current_routing(waiting.store).champion == "v1"
    with waiting.store.engine.connect() as conn:
        row = conn.execute(select(approvals)).one()
    assert (row.decision, row.approver, row.reason) == ("rejected", BOB, "tone got worse on refunds")


# --- Socket Mode ------------------------------------------------------------------------------------------------------


def test_socket_mode_connects_with_the_app_token_and_handles_the_same_payloads(
    project: Path, slack: SlackApiServer, lazy_work: ThreadPoolExecutor
) -> None:
    ctx = Context(settings=_settings(project, slack, slack={"mode": "socket"}))
    handler = None
    try:
        approvals_ = SlackApprovals(ctx, web_client(ctx.settings, TOKENS.bot_token))
        app = build_app(approvals_, SlackTokens(TOKENS.bot_token, TOKENS.app_token, ""), "socket", executor=lazy_work)
        handler = socket_mode_handler(app, TOKENS)
        assert handler.app_token == "xapp-test-token" and handler.client.app_token == "xapp-test-token"
        handler.connect()
        assert slack.socket is not None and slack.socket.connected.wait(10)
        [opened] = slack.calls_to("apps.connections.open")
        assert opened.token == "xapp-test-token"  # the app-level token, not the bot token

        posted = approvals_.post(_pending())
        click = _click_payload(ACTION_APPROVE, ApprovalRef.of(_pending()), MALLORY, (posted.channel, posted.ts), "1700000020.000001")
        envelope = slack.socket.push("interactive", click)
        assert slack.socket.ack_for(envelope)["envelope_id"] == envelope
        told = slack.wait_for(lambda: slack.ephemeral, what="the refusal over Socket Mode")
        assert told[0]["user"] == MALLORY and "not on the approver list" in told[0]["text"]

        mention = {
            "type": "event_callback",
            "team_id": "T0TEAM",
            "api_app_id": "A0FLY",
            "event_id": "Ev0001",
            "event_time": 1700000000,
            "event": {
                "type": "app_mention",
                "user": ALICE,
                "text": "<@U0FLYBOT> approvals?",
                "ts": "1700000030.000100",
                "channel": "C0APPROVALS",
                "event_ts": "1700000030.000100",
            },
        }
        slack.socket.ack_for(slack.socket.push("events_api", mention))
        replies = slack.wait_for(lambda: [m for m in slack.messages() if m.get("thread_ts")], what="the thread reply")
        assert replies[0]["thread_ts"] == "1700000030.000100" and "No approvals pending" in replies[0]["text"]
        slack.socket.ack_for(slack.socket.push("events_api", mention, retry_attempt=1))  # Slack's retry of the event
        _settled(lazy_work)  # acked after Bolt queued its lazy work, which has now run to its end
        assert len([m for m in slack.messages() if m.get("thread_ts")]) == 1
    finally:
        if handler is not None:
            handler.close()
        ctx.close()


# --- the daemon's side ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_daemon_posts_pending_approvals_and_closes_those_decided_in_a_terminal(waiting: Context, slack: SlackApiServer) -> None:
    daemon = Daemon(waiting, slack_mode="http", port=0, tokens=TOKENS).start()
    try:
        assert daemon.http is not None and daemon.describe_slack().startswith("http on http://127.0.0.1:")
        [message] = slack.wait_for(slack.messages, what="the approval request")
        assert message["blocks"][0]["text"]["text"] == "Approval needed: v2"
        done = decide(waiting, "v2", "approved", "carol", "looks good", "terminal")  # approvals.approvers is empty: any local user
        assert done.state == "done" and registry.current_routing(waiting.store).champion == "v2"
        slack.wait_for(lambda: slack.calls_to("chat.update"), what="the closing update")
        text = json.dumps(slack.messages()[0]["blocks"])
        assert "v2 promoted to champion, approved by carol (terminal)" in text
        rounds = daemon.slack_sync_rounds  # a few more sync rounds, all begun after the close was seen, change nothing
        slack.wait_for(lambda: daemon.slack_sync_rounds >= rounds + 3, what="three more sync rounds")
        assert len(slack.calls_to("chat.update")) == 1 and len(slack.messages()) == 1
    finally:
        assert daemon.stop() == []


# --- `flywheel slack test`, and Slack failures in one line ----------------------------------------------------------


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: Slack out of reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/"


def _slack_toml(project: Path, api_url: str, channel: str = "#approvals") -> None:
    (project / "flywheel.toml").write_text(f'[slack]\nchannel = "{channel}"\napi_url = "{api_url}"\n', encoding="utf-8")


def test_slack_test_posts_one_message_and_prints_one_line(
    project: Path, slack: SlackApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _slack_toml(project, slack.api_url)
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKENS.bot_token)
    assert main(["-C", str(project), "slack", "test"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("ok: posted to #approvals (channel C0APPROVALS, message ")
    assert "as flywheel in flywheel test; slack.mode is off" in out
    [message] = slack.messages()
    assert message["text"].startswith("flywheel test message from project project")
    assert [c.token for c in slack.calls_to("chat.postMessage")] == [TOKENS.bot_token]


def test_slack_test_refusals_are_one_line_with_what_to_fix(
    project: Path, slack: SlackApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _slack_toml(project, slack.api_url)
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    assert main(["-C", str(project), "slack", "test"]) == 2
    assert "SLACK_BOT_TOKEN is not set" in capsys.readouterr().err and slack.calls == []

    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-revoked")  # Slack answers invalid_auth
    assert main(["-C", str(project), "slack", "test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: Slack refused auth.test: invalid_auth: SLACK_BOT_TOKEN was refused")

    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKENS.bot_token)
    _slack_toml(project, slack.api_url, channel="#no-such-channel")
    assert main(["-C", str(project), "slack", "test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Slack refused chat.postMessage: channel_not_found" in err and "slack.channel" in err
    assert slack.messages() == []


def test_slack_test_with_slack_out_of_reach_is_one_line_exit_4(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _closed_port_url()
    _slack_toml(project, url)
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKENS.bot_token)
    assert main(["-C", str(project), "slack", "test"]) == InfrastructureError.exit_code == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: Slack auth.test failed: cannot reach Slack at {url}: ") and "refused" in err.lower()


@pytest.mark.slow
def test_the_daemon_logs_a_refused_token_in_one_line_and_retries_until_slack_takes_it(
    waiting: Context, slack: SlackApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flywheel")
    rotated = SlackTokens(bot_token="xoxb-rotated", app_token="", signing_secret=SECRET)
    daemon = Daemon(waiting, slack_mode="http", port=0, tokens=rotated).start()  # Slack still knows the old token
    try:
        assert daemon.http is None and "not connected yet (retrying)" in daemon.describe_slack()
        failures = slack.wait_for(lambda: [r for r in caplog.records if "retrying in" in r.getMessage()][1:], what="a retry")
        assert all(r.levelname == "WARNING" and "\n" not in r.getMessage() and r.exc_info is None for r in failures)
        assert "Slack refused the bot token (auth.test)" in failures[0].getMessage()
        assert slack.messages() == []
        with slack.state.lock:
            slack.state.bot_token = rotated.bot_token  # the new token reaches Slack
        [message] = slack.wait_for(slack.messages, what="the approval request after the retry")
        assert message["blocks"][0]["text"]["text"] == "Approval needed: v2"
        assert daemon.http is not None and any("slack: connected, http on" in r.getMessage() for r in caplog.records)
    finally:
        assert daemon.stop() == []


def test_the_daemon_runs_on_with_slack_out_of_reach(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flywheel")
    url = _closed_port_url()
    ctx = Context(settings=load_settings(project, slack={"channel": "#approvals", "api_url": url, "sync_interval_s": 0.2}))
    daemon = Daemon(ctx, slack_mode="socket", tokens=TOKENS).start()
    try:
        lines = _wait_logged(caplog, "cannot reach Slack", 2)
        assert lines[0] == f"slack: Slack auth.test failed: cannot reach Slack at {url}: Connection refused; retrying in 0.2 s"
        assert daemon.scheduler.running and daemon.socket is None
    finally:
        assert daemon.stop() == []
        ctx.close()


def _wait_logged(caplog: pytest.LogCaptureFixture, text: str, count: int, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r.getMessage() for r in caplog.records if text in r.getMessage()]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} log lines with {text!r}: {[r.getMessage() for r in caplog.records]}")
