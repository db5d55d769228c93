"""The web console over Starlette's TestClient: a real store, real ingest, the real approval path.

The browser layer (tests/test_console_browser.py) drives the same routes in Chromium after a real quick
cycle; this layer is fast and covers the rules: login or 401, CSRF, the approver list, one decision per
report, labels that are `flywheel label`'s records, markup in logs shown as text, pages of failures.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
from release_helpers import make_adapter
from starlette.testclient import TestClient

from flywheel.cli import main
from flywheel.console.app import build_app
from flywheel.console.auth import create_user, revoke_user
from flywheel.console.web import REPORT_CSP
from flywheel.context import Context
from flywheel.data.ingest import ingest_files
from flywheel.data.labelling import LabelRequest, QueueLabeller
from flywheel.evals.report import report_hash_of
from flywheel.records import Failure, Verdict
from flywheel.release import approvals, registry
from flywheel.settings import load_settings
from flywheel.store import failures as failure_repo
from flywheel.store import labels as label_repo
from flywheel.store.schema import approvals as approvals_table

EVIL = "<script>alert('owned')</script>"
PAGES = ["/", "/approvals", "/approvals/v2", "/labelling", "/failures", "/versions"]


class World:
    def __init__(self, project: Path, ctx: Context, tokens: dict[str, str], failure_ids: list[str]):
        self.project, self.ctx, self.tokens, self.failure_ids = project, ctx, tokens, failure_ids
        self.app = build_app(ctx, secret="test-secret")

    def client(self, user: str | None = "alice") -> TestClient:
        client = TestClient(self.app, headers={"accept": "text/html"})
        if user is not None:
            answer = client.post(
                "/login", data={"token": self.tokens[user], "csrf": csrf_of(client.get("/login").text)}, follow_redirects=False
            )
            assert answer.status_code == 303, answer.text
        return client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def _write_report(folder: Path, candidate: str, champion: str) -> Path:
    """A report.json in the eval report's shape (the parts the console reads) and its report.html."""
    folder.mkdir(parents=True)
    rate = lambda count, n: {"count": count, "n": n, "rate": count / n, "low": 0.0, "high": 1.0}  # noqa: E731
    metrics = lambda wrong: {  # noqa: E731
        "size": 40,
        "task_success": rate(40 - wrong, 40),
        "problem_rates": {"wrong_intent": rate(wrong, 40), "over_promise": rate(1, 40)},
        "per_intent": {"refund": rate(20 - wrong // 2, 20), EVIL: rate(20 - wrong // 2, 20)},
    }
    document = {
        "candidate": {"name": candidate, "version": candidate},
        "champion": {"name": champion, "version": champion},
        "targeted": ["wrong_intent"],
        "champion_metrics": {"test": metrics(10)},
        "candidate_metrics": {"test": metrics(2)},
        "gate": {
            "passed": True,
            "reasons": ["wrong_intent fell 80%"],
            "checks": [{"kind": "targeted", "subject": "wrong_intent", "passed": True, "reason": f"wrong_intent fell 80% {EVIL}"}],
        },
    }
    path = folder / "report.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    (folder / "report.html").write_text(f"<!doctype html><p>the report of {candidate}</p>", encoding="utf-8")
    return path


@pytest.fixture
def world(project: Path, tmp_path: Path) -> Any:
    (project / "flywheel.toml").write_text('[approvals]\napprovers = ["alice"]\n[console]\npage_size = 5\n', encoding="utf-8")
    ctx = Context(settings=load_settings(project))
    store = ctx.store
    registry.first_champion(store, "tiny-base", actor="test")
    candidate = registry.register_version(store, base_model="tiny-base", adapter_path=make_adapter(tmp_path / "adapter", 1))
    report = _write_report(tmp_path / "report-v2", candidate.id, "v1")
    registry.attach_eval(
        store, candidate.id, report_path=str(report), report_hash=report_hash_of(report), gate_passed=True, metrics={"task_success": 0.95}
    )
    # logged text with markup in every field a page shows, through the real ingest
    logs = tmp_path / "logs.jsonl"
    with logs.open("w", encoding="utf-8") as out:
        for n in range(12):
            line = {
                "id": f"conv-{n}",
                "timestamp": "2026-01-05T10:00:00Z",
                "model_version": "v1",
                "intent": EVIL if n == 0 else "refund",
                "messages": [{"role": "user", "content": f"{EVIL} question {n}"}, {"role": "assistant", "content": f"{EVIL} answer {n}"}],
                "feedback": "down",
                "complaint": EVIL,
            }
            out.write(json.dumps(line) + "\n")
    ingest_files(store, ctx.settings, [logs])
    ids = [failure_repo.failure_id_for(f"conv-{n}") for n in range(12)]
    with store.begin() as conn:
        failure_repo.insert_failures(
            conn,
            [
                Failure(
                    id=fid,
                    interaction_id=f"conv-{n}",
                    rule="thumbs_down",
                    risk=float(n),
                    first_seen_version="v1",
                    intent=EVIL if n == 0 else "refund",
                )
                for n, fid in enumerate(ids)
            ],
        )
        for n, fid in enumerate(ids):
            problem = "wrong_intent" if n % 2 else "over_promise"
            failure_repo.save_verdict(
                conn, Verdict(failure_id=fid, is_failure=True, problem_type=problem, severity="medium", judge="rule", rationale=EVIL)
            )
    QueueLabeller(ctx.settings.state_path / "label_requests.jsonl").label(
        [LabelRequest(failure_id=fid, intent="refund", text=EVIL, logged_answer=EVIL) for fid in ids[:4]]
    )
    tokens = {name: create_user(store, name) for name in ("alice", "bob")}
    yield World(project, ctx, tokens, ids)
    ctx.close()


def _approval_rows(world: World) -> list[Any]:
    with world.ctx.store.engine.connect() as conn:
        return conn.execute(approvals_table.select()).fetchall()


# --- who may see and do what -----------------------------------------------------------------------------------


def test_without_a_session_every_page_is_the_login_page_or_401_and_never_data(world: World) -> None:
    browser = TestClient(world.app, headers={"accept": "text/html"})
    script = TestClient(world.app)
    for path in [*PAGES, "/reports/v2", f"/failures/{world.failure_ids[0]}"]:
        redirect = browser.get(path, follow_redirects=False)
        assert redirect.status_code == 303 and redirect.headers["location"].startswith("/login"), path
        refused = script.get(path)
        assert refused.status_code == 401 and "question" not in refused.text and "v2" not in refused.text, path
    assert script.post("/approvals/v2", data={"decision": "approved"}).status_code == 401
    assert _approval_rows(world) == []


def test_a_wrong_or_revoked_token_does_not_log_in_and_revoking_ends_a_session(world: World) -> None:
    client = TestClient(world.app, headers={"accept": "text/html"})
    answer = client.post("/login", data={"token": "fwc-not-a-token", "csrf": csrf_of(client.get("/login").text)})
    assert answer.status_code == 401 and "not a console user" in answer.text
    alice = world.client("alice")
    assert alice.get("/").status_code == 200
    revoke_user(world.ctx.store, "alice")
    assert alice.get("/", follow_redirects=False).status_code == 303  # the session's user is gone


def test_the_trusted_header_counts_only_from_a_trusted_proxy(world: World) -> None:
    header = {"X-Forwarded-User": "alice"}
    settings = load_settings(world.project, console={"trusted_header": "X-Forwarded-User"})
    untrusted = TestClient(build_app(Context(settings=settings, _store=world.ctx.store), secret="s"), headers={"accept": "text/html"})
    assert untrusted.get("/", headers=header, follow_redirects=False).status_code == 303  # "testclient" is not a trusted address
    trusted_settings = load_settings(world.project, console={"trusted_header": "X-Forwarded-User", "trusted_proxies": ["testclient"]})
    trusted = TestClient(build_app(Context(settings=trusted_settings, _store=world.ctx.store), secret="s"), headers={"accept": "text/html"})
    page = trusted.get("/", headers=header)
    assert page.status_code == 200 and '<span id="user">alice</span>' in page.text


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(world: World) -> None:
    alice = world.client("alice")
    target = registry.resolve(world.ctx.store, "v2")
    for token in (None, "forged"):
        data = {"decision": "approved", "report_hash": target.eval_report_hash or "", **({"csrf": token} if token else {})}
        assert alice.post("/approvals/v2", data=data).status_code == 403
    assert _approval_rows(world) == [] and registry.alias_target(world.ctx.store, "champion") == "v1"


def test_a_user_not_on_the_approver_list_can_look_but_not_decide(world: World) -> None:
    bob = world.client("bob")
    page = bob.get("/approvals/v2")
    assert page.status_code == 200 and 'id="approve"' not in page.text and "not in" in page.text
    target = registry.resolve(world.ctx.store, "v2")
    answer = bob.post("/approvals/v2", data={"decision": "approved", "report_hash": target.eval_report_hash, "csrf": csrf_of(page.text)})
    assert answer.status_code == 403 and "'bob' is not in approvals.approvers" in html.unescape(answer.text)
    versions = bob.get("/versions")
    assert 'id="rollback"' not in versions.text
    assert _approval_rows(world) == []


# --- deciding -------------------------------------------------------------------------------------------------


def test_approving_twice_decides_once_through_the_approval_path_with_channel_web(world: World) -> None:
    alice = world.client("alice")
    page = alice.get("/approvals/v2")
    form = {"decision": "approved", "report_hash": re.search(r'name="report_hash" value="([0-9a-f]+)"', page.text).group(1)}
    first = alice.post("/approvals/v2", data={**form, "csrf": csrf_of(page.text)})
    assert "v2 promoted to champion, approved by alice (web)" in first.text
    second = alice.post("/approvals/v2", data={**form, "csrf": csrf_of(page.text)})  # the double click, from the old page
    assert "Already decided: v2 was approved by alice (web)" in second.text and "Nothing changed" in second.text
    rows = _approval_rows(world)
    assert [(r.version, r.decision, r.approver, r.channel) for r in rows] == [("v2", "approved", "alice", "web")]
    assert registry.alias_target(world.ctx.store, "champion") == "v2"
    assert approvals.approvals_for(world.ctx.store, "v2")[0].report_hash == form["report_hash"]


def test_a_rejection_needs_a_reason_and_a_stale_report_hash_decides_nothing(world: World) -> None:
    alice = world.client("alice")
    page = alice.get("/approvals/v2")
    csrf = csrf_of(page.text)
    current = registry.resolve(world.ctx.store, "v2").eval_report_hash or ""
    assert (
        alice.post("/approvals/v2", data={"decision": "rejected", "report_hash": current, "reason": " ", "csrf": csrf}).status_code == 400
    )
    stale = alice.post("/approvals/v2", data={"decision": "approved", "report_hash": "0" * 64, "csrf": csrf})
    assert "report changed since this page was shown" in stale.text
    assert _approval_rows(world) == []
    rejected = alice.post(
        "/approvals/v2", data={"decision": "rejected", "report_hash": current, "reason": "worse on refunds", "csrf": csrf}
    )
    assert "v2 rejected by alice" in rejected.text
    assert registry.resolve(world.ctx.store, "v2").status == "rejected"


def test_rollback_needs_an_approver_and_happens_once(world: World) -> None:
    alice = world.client("alice")
    page = alice.get("/approvals/v2")
    alice.post(
        "/approvals/v2",
        data={"decision": "approved", "report_hash": registry.resolve(world.ctx.store, "v2").eval_report_hash, "csrf": csrf_of(page.text)},
    )
    versions = alice.get("/versions")
    assert 'id="rollback"' in versions.text
    form = {"champion": "v2", "previous": "v1", "reason": "complaints", "csrf": csrf_of(versions.text)}
    assert "rolled back v2; champion is v1" in alice.post("/versions/rollback", data=form).text
    assert "already rolled back" in alice.post("/versions/rollback", data=form).text
    assert registry.alias_target(world.ctx.store, "champion") == "v1"


# --- what pages show ---------------------------------------------------------------------------------------------


def test_markup_from_the_logs_is_inert_on_every_page(world: World) -> None:
    alice = world.client("alice")
    paths = [*PAGES, f"/failures/{world.failure_ids[0]}", f"/failures?intent={EVIL}", "/labelling?at=1"]
    for path in paths:
        page = alice.get(path)
        assert page.status_code == 200, (path, page.text[:300])
        assert "<script>alert" not in page.text, path
        if path not in ("/", "/approvals", "/versions"):  # the pages that show logged text show it as text
            assert "&lt;script&gt;alert(" in page.text, path
        # the only script any page loads is the console's own file
        assert re.findall(r"<script[^>]*>", page.text) == ['<script src="/static/console.js" defer>'], path
        assert "script-src 'self'" in page.headers["content-security-policy"] and page.headers["x-frame-options"] == "DENY"


def test_the_report_is_served_with_the_reports_own_strict_csp(world: World) -> None:
    page = world.client("alice").get("/reports/v2")
    assert page.status_code == 200 and "the report of v2" in page.text
    assert page.headers["content-security-policy"] == REPORT_CSP and "default-src 'none'" in REPORT_CSP


def test_a_label_from_the_queue_is_the_record_flywheel_label_writes(world: World) -> None:
    alice = world.client("alice")
    page = alice.get("/labelling")
    assert "4 open, 0 done" in page.text
    first, second = world.failure_ids[0], world.failure_ids[1]
    assert f'data-failure="{first}"' in page.text
    data = {"intent": "refund", "answer": "Refunds take 5 days.", "at": "0", "csrf": csrf_of(page.text)}
    alice.post(f"/labelling/{first}", data=data)
    alice.post(f"/labelling/{first}", data=data)  # a double submit stores one label
    assert main(["-C", str(world.project), "label", second, "--intent", "refund", "--answer", "Refunds take 5 days.", "--by", "alice"]) == 0
    with world.ctx.store.engine.connect() as conn:
        by_console, by_cli = label_repo.latest(conn, first), label_repo.latest(conn, second)
    assert by_console is not None and by_cli is not None
    assert (
        (by_console.label, by_console.labeller)
        == (by_cli.label, by_cli.labeller)
        == ({"intent": "refund", "answer": "Refunds take 5 days.", "fine": False}, "alice")
    )
    assert label_repo.count(world.ctx.store) == 2
    after = alice.get("/labelling")
    assert "2 open, 2 done" in after.text and f'data-failure="{first}"' not in after.text
    fine = alice.post(f"/labelling/{world.failure_ids[2]}", data={"fine": "1", "at": "0", "csrf": csrf_of(after.text)})
    assert f"labelled {world.failure_ids[2]}: fine as answered" in fine.text


def test_failures_page_through_in_risk_order_and_filter(world: World) -> None:
    alice = world.client("alice")
    seen: list[str] = []
    url = "/failures"
    for _ in range(5):
        page = alice.get(url)
        seen += re.findall(r'href="/failures/(f-[0-9a-f]+)"', page.text)
        found = re.search(r'id="next" href="([^"]+)"', page.text)
        if not found:
            break
        url = found.group(1).replace("&amp;", "&")
    assert seen == list(reversed(world.failure_ids))  # risk n: highest first, each once, in pages of 5
    only = alice.get("/failures?problem_type=wrong_intent")
    shown = re.findall(r'href="/failures/(f-[0-9a-f]+)"', only.text)
    assert shown and all(world.failure_ids.index(fid) % 2 == 1 for fid in shown)
    assert alice.get("/failures?problem_type=nonsense").status_code == 400


def test_failure_provenance_and_overview(world: World) -> None:
    alice = world.client("alice")
    chain = alice.get(f"/failures/{world.failure_ids[3]}").text
    for step in ("interaction", "cluster", "verdict", "label", "correction", "snapshot", "version"):
        assert f"<b>{step}</b>" in chain
    assert "conv-3" in chain and "wrong_intent" in chain
    overview = alice.get("/").text
    assert 'href="/approvals/v2"' in overview and '<dd id="champion">v1</dd>' in overview and "4 item(s) to label" in overview


def test_console_users_cli_prints_the_token_once(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-C", str(world.project), "console", "users", "add", "carol"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("fwc-")
    assert main(["-C", str(world.project), "console", "users", "list"]) == 0
    listed = capsys.readouterr().out
    assert "carol\tactive" in listed and token not in listed
    assert main(["-C", str(world.project), "console", "users", "add", "carol"]) == 2
    assert main(["-C", str(world.project), "console", "users", "revoke", "carol"]) == 0
    assert main(["-C", str(world.project), "console", "users", "revoke", "nobody"]) == 3


def test_failure_pages_on_sqlite_and_postgresql(any_store: Any) -> None:
    from release_helpers import add_traffic

    from flywheel.store.failure_pages import PageFilter, distinct_values, failure_page

    add_traffic(any_store, "v1", 12, ["wrong_intent", "over_promise"] * 6)
    first = failure_page(any_store, PageFilter(), 5)
    assert len(first.rows) == 5 and first.next_after is not None
    rest = failure_page(any_store, PageFilter(), 50, first.next_after)
    assert len(rest.rows) == 7 and not {r.id for r in rest.rows} & {r.id for r in first.rows} and rest.next_after is None
    assert {r.problem_type for r in failure_page(any_store, PageFilter(problem_type="wrong_intent"), 50).rows} == {"wrong_intent"}
    assert distinct_values(any_store, "rule") == ["thumbs_down"]


def test_the_queue_shows_the_nearest_knowledge_base_sections_before_any_correction(world: World, tmp_path: Path) -> None:
    from flywheel.data.kb import add_files

    kb = tmp_path / "kb.jsonl"
    section = {"id": "refund-policy", "kind": "policy", "intent": "refund", "title": "refunds", "text": "Refunds reach the card in 5 days."}
    kb.write_text(json.dumps(section) + "\n", encoding="utf-8")
    assert add_files(world.ctx.index, [kb]).sections == 1
    page = world.client("alice").get("/labelling")
    assert "Knowledge-base context" in page.text and "refund-policy" in page.text and "Refunds reach the card in 5 days." in page.text
