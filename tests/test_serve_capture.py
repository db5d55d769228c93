"""Capture and feedback: every answer lands in the store as an Interaction, off the request path; a slow,
locked or unreachable store slows no request and loses nothing (spill files, replayed later); feedback
sets the signals the capture rules read."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import PG_ADMIN_DSN, _truncate_all
from openai_server import OpenAIServer
from serve_helpers import chat, running_gateway, serve_settings
from sqlalchemy import select

from flywheel.data.triage import TriageSummary, capture_new, matched_rules
from flywheel.records import utcnow
from flywheel.release import registry
from flywheel.serve.backends import ProxyBackend
from flywheel.serve.capture import Capture, Served
from flywheel.serve.feedback import FeedbackItem
from flywheel.settings import load_settings
from flywheel.store import feedback as feedback_repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store, make_engine, open_store
from flywheel.store.schema import feedback_events, interactions

EMAIL = "jane.doe@example.com"


@pytest.fixture
def upstream() -> Iterator[OpenAIServer]:
    with OpenAIServer(models=("tiny-base",), default="We will look into it.") as server:
        yield server


def _served(i: int, text: str = "where is my parcel?", **extra: object) -> Served:
    return Served(
        id=f"chatcmpl-test-{i}",
        timestamp=utcnow() - timedelta(seconds=i),
        model_version="v1",
        messages=[{"role": "user", "content": f"{text} I am {EMAIL} ({i})"}, {"role": "assistant", "content": "On its way."}],
        latency_ms=1.5,
        prompt_tokens=9,
        completion_tokens=3,
        user_id=f"user-{i}",
        client="unit",
        **extra,  # type: ignore[arg-type]
    )


def _spill_text(folder: Path) -> str:
    return "".join(p.read_text() for p in folder.glob("spill-*.jsonl"))


def test_a_locked_store_slows_no_request_and_loses_nothing(store: Store, upstream: OpenAIServer) -> None:
    registry.register_base(store, "tiny-base")
    database = store.engine.url.database
    assert database
    with running_gateway(store, ProxyBackend(upstream.base_url), capture_queue=10, capture_batch=5) as gw:
        lock = sqlite3.connect(database, timeout=30)
        lock.execute("BEGIN IMMEDIATE")  # holds the write lock: every write waits on it
        try:
            with gw.http() as http:
                responses = [chat(http, text=f"I am {EMAIL}, order {i}", user=f"u{i}") for i in range(80)]
            # every request was answered while the store could not take a single row
            assert all(r.status_code == 200 for r in responses)
            stats = gw.gateway.capture.stats()
            assert stats["stored"] == 0 and stats["spilled"] >= 60, stats
            spilled = _spill_text(gw.gateway.capture.spill.folder)
            assert spilled and EMAIL not in spilled and "[EMAIL]" in spilled  # scrubbed before it touches the disk
        finally:
            lock.rollback()
            lock.close()
        gw.settle()
        stats = gw.gateway.capture.stats()
    ids = {r.headers["x-flywheel-interaction-id"] for r in responses}
    stored = {i.id: i for i in interaction_repo.iter_all(store)}
    assert set(stored) == ids and stats["lost"] == 0 and stats["replayed"] >= 60
    assert all(EMAIL not in i.last_user_text() for i in stored.values())
    assert not list(gw.gateway.capture.spill.folder.glob("spill-*"))  # replayed files are gone


def test_an_unreachable_store_spills_and_a_later_start_replays(store: Store, tmp_path: Path) -> None:
    settings = serve_settings(store.settings, spill_dir=str(tmp_path / "spill"))
    down = Store(engine=make_engine("postgresql+psycopg://nobody@127.0.0.1:9/none"), settings=settings)  # nothing listens
    first = Capture(down, settings).start()
    for i in range(50):
        first.submit(_served(i))
    first.submit(FeedbackItem(interaction_id="chatcmpl-test-0", kind="thumbs_down", value=None, client="unit"))
    assert first.wait_idle(timeout=20)
    first.close()
    stats = first.stats()
    assert stats["store_errors"] >= 1 and stats["stored"] == 0 and stats["spilled"] == 51 and stats["lost"] == 0
    assert EMAIL not in _spill_text(tmp_path / "spill")

    second = Capture(store, settings).start()  # the next start (the store is back): replays what was spilled
    assert second.wait_idle(timeout=20, replayed=True)
    second.close()
    assert interaction_repo.count(store) == 50 and second.stats()["replayed"] == 51
    first_row = interaction_repo.get(store, "chatcmpl-test-0")
    assert first_row is not None and first_row.signals.feedback == "down" and first_row.source == "gateway:unit"


def test_shutdown_flushes_the_queue(store: Store, upstream: OpenAIServer) -> None:
    registry.register_base(store, "tiny-base")
    with running_gateway(store, ProxyBackend(upstream.base_url), capture_batch=1000) as gw:
        with gw.http() as http:
            ids = [chat(http, user=f"u{i}").headers["x-flywheel-interaction-id"] for i in range(60)]
        # no waiting: stopping the server right away must still write everything
    assert {i.id for i in interaction_repo.iter_all(store)} == set(ids)
    assert gw.gateway.capture.stats()["lost"] == 0


def test_a_store_stuck_at_shutdown_spills_and_the_next_start_replays(store: Store, upstream: OpenAIServer) -> None:
    registry.register_base(store, "tiny-base")
    database = store.engine.url.database
    assert database
    lock = sqlite3.connect(database, timeout=30)
    with running_gateway(store, ProxyBackend(upstream.base_url), shutdown_flush_s=0.3, capture_batch=8) as gw:
        lock.execute("BEGIN IMMEDIATE")
        with gw.http() as http:
            ids = [chat(http, user=f"u{i}").headers["x-flywheel-interaction-id"] for i in range(40)]
    # the server stopped while the store was still locked: what it could not write is on disk
    lock.rollback()
    lock.close()
    folder = gw.gateway.capture.spill.folder
    assert list(folder.glob("spill-*.jsonl"))
    restarted = Capture(store, gw.gateway.settings).start()
    assert restarted.wait_idle(timeout=30, replayed=True)
    restarted.close()
    assert {i.id for i in interaction_repo.iter_all(store)} == set(ids)


def test_feedback_that_arrives_before_its_interaction_is_applied_on_insert(store: Store, tmp_path: Path) -> None:
    settings = serve_settings(store.settings, spill_dir=str(tmp_path / "spill"))
    capture = Capture(store, settings).start()
    try:
        capture.submit(FeedbackItem(interaction_id="chatcmpl-test-7", kind="followup", value=2, client="unit"))
        capture.submit(FeedbackItem(interaction_id="chatcmpl-test-7", kind="escalation", value=None, client="unit"))
        assert capture.wait_idle()
        assert interaction_repo.get(store, "chatcmpl-test-7") is None
        capture.submit(_served(7))  # e.g. replayed from a spill file after its feedback was stored
        assert capture.wait_idle()
        capture.submit(FeedbackItem(interaction_id="chatcmpl-test-7", kind="followup", value=1, client="unit"))
        capture.submit(_served(7))  # the same interaction again (a replay after a crash) changes nothing
        assert capture.wait_idle()
    finally:
        capture.close()
    row = interaction_repo.get(store, "chatcmpl-test-7")
    assert row is not None and row.signals.followups == 3 and row.signals.escalated_to_human
    with store.engine.connect() as conn:
        assert len(conn.execute(feedback_events.select()).fetchall()) == 3


def test_rows_the_store_cannot_hold_are_kept_in_rejected_jsonl(project: Path, tmp_path: Path) -> None:
    settings = serve_settings(load_settings(project, policies={"max_message_chars": 200}), spill_dir=str(tmp_path / "spill"))
    store = open_store(settings)
    try:
        capture = Capture(store, settings).start()
        capture.submit(_served(1))
        capture.submit(_served(2, text="x" * 500))  # over policies.max_message_chars: the store refuses it, as ingest does
        capture.submit(_served(3, user_tier="enterprise", intent="refund"))
        assert capture.wait_idle()
        capture.close()
        assert capture.stats()["rejected"] == 1 and capture.stats()["lost"] == 0
        assert interaction_repo.count(store) == 2
        rejected = (tmp_path / "spill" / "rejected.jsonl").read_text()
        assert "chatcmpl-test-2" in rejected and "oversized" in rejected and EMAIL not in rejected
        row = interaction_repo.get(store, "chatcmpl-test-3")
        assert row is not None and row.signals.user_tier == "enterprise" and row.intent == "refund"
    finally:
        store.dispose()


def test_feedback_sets_the_signals_the_capture_rules_read(any_store: Store, upstream: OpenAIServer) -> None:
    registry.register_base(any_store, "tiny-base")
    with running_gateway(any_store, ProxyBackend(upstream.base_url)) as gw:
        http = gw.http()
        ids = [chat(http, text=f"question {i}", user=f"user-{i}").headers["x-flywheel-interaction-id"] for i in range(6)]
        events = [
            (ids[0], "thumbs_down", None),
            (ids[1], "escalation", None),
            (ids[2], "followup", None),
            (ids[2], "followup", None),
            (ids[3], "qa_verdict", "reject"),
            (ids[4], "complaint", "It promised a refund! Call me on +1 415 555 0100"),
            (ids[5], "thumbs_up", None),
        ]
        for interaction_id, kind, value in events:
            body = {"interaction_id": interaction_id, "kind": kind, **({"value": value} if value is not None else {})}
            response = http.post("/v1/feedback", json=body)
            assert response.status_code == 202 and response.json()["status"] == "accepted", response.text
        bad = [
            ({"interaction_id": ids[0], "kind": "love"}, 400, "kind"),
            ({"interaction_id": ids[0], "kind": "qa_verdict", "value": "great"}, 400, "value"),
            ({"interaction_id": ids[0], "kind": "followup", "value": "two"}, 400, "value"),
            ({"kind": "thumbs_up"}, 400, "interaction_id"),
            ({"interaction_id": "chatcmpl-nope", "kind": "thumbs_up"}, 404, "interaction_id"),
        ]
        for body, status, param in bad:
            response = http.post("/v1/feedback", json=body)
            assert response.status_code == status and response.json()["error"]["param"] == param, response.text
        gw.settle()
    rules = any_store.settings.rules
    rows = [interaction_repo.get(any_store, i) for i in ids]
    assert all(rows)
    caught = [matched_rules(row, rules) for row in rows if row is not None]
    assert caught == [["thumbs_down"], ["escalation"], ["repeated_followups"], ["qa_reject"], ["complaint"], []]
    complaint = rows[4].signals.complaint if rows[4] else None
    assert complaint and "555" not in complaint and "[PHONE]" in complaint  # scrubbed before it is stored
    summary = TriageSummary()
    capture_new(any_store, rules, summary)
    assert summary.captured == 5
    with any_store.engine.connect() as conn:
        stored_events = conn.execute(feedback_events.select().order_by(feedback_events.c.id)).fetchall()
    assert [e.kind for e in stored_events] == [kind for _, kind, _ in events]
    assert all(e.client and e.client.startswith("test-") for e in stored_events)


def test_feedback_takes_the_log_vocabulary_too_and_stores_one(store: Store, upstream: OpenAIServer) -> None:
    """Logs say `feedback: down`; the API's kinds are thumbs_down/thumbs_up. Both are accepted, and
    feedback_events and the signals hold one form whichever the client sent."""
    registry.register_base(store, "tiny-base")
    with running_gateway(store, ProxyBackend(upstream.base_url)) as gw:
        http = gw.http()
        ids = [chat(http, text=f"question {i}", user=f"user-{i}").headers["x-flywheel-interaction-id"] for i in range(4)]
        sent = [(ids[0], "down"), (ids[1], "thumbs_down"), (ids[2], "up"), (ids[3], "thumbs_up")]
        for interaction_id, kind in sent:
            response = http.post("/v1/feedback", json={"interaction_id": interaction_id, "kind": kind})
            assert response.status_code == 202, response.text
            assert response.json()["kind"] == ("thumbs_down" if kind.endswith("down") else "thumbs_up")
        for body, param in (
            ({"interaction_id": ids[0], "kind": "sideways"}, "kind"),
            ({"interaction_id": ids[0], "kind": "down", "value": 1}, "value"),
        ):
            response = http.post("/v1/feedback", json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        unknown = http.post("/v1/feedback", json={"interaction_id": ids[0], "kind": "sideways"}).json()["error"]["message"]
        assert "'sideways' is not one of" in unknown and "thumbs_down" in unknown and ", up, down" in unknown  # both vocabularies named
        gw.settle()
    rows = [interaction_repo.get(store, i) for i in ids]
    assert [r.signals.feedback for r in rows if r is not None] == ["down", "down", "up", "up"]
    assert [matched_rules(r, store.settings.rules) for r in rows if r is not None] == [["thumbs_down"], ["thumbs_down"], [], []]
    with store.engine.connect() as conn:
        kinds = [e.kind for e in conn.execute(feedback_events.select().order_by(feedback_events.c.id))]
    assert kinds == ["thumbs_down", "thumbs_down", "thumbs_up", "thumbs_up"]


def test_postgres_going_away_slows_no_request_and_loses_nothing(pg_url: str, project: Path, upstream: OpenAIServer) -> None:
    settings = load_settings(project, store={"url": pg_url})

    _truncate_all(pg_url)
    store = open_store(settings)
    name = pg_url.rsplit("/", 1)[1]
    admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    try:
        registry.register_base(store, "tiny-base")
        with running_gateway(store, ProxyBackend(upstream.base_url)) as gw:
            with gw.http() as http:
                before = [chat(http, user=f"a{i}") for i in range(10)]
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,)
                )
                during = [chat(http, user=f"b{i}") for i in range(40)]
                assert all(r.status_code == 200 for r in before + during)
                assert gw.gateway.capture.wait_idle(timeout=20)
                assert gw.gateway.capture.stats()["store_errors"] >= 1 and gw.gateway.capture.stats()["spill_pending"]
                assert http.get("/health").json()["status"] == "degraded"
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                gw.settle()
        ids = {r.headers["x-flywheel-interaction-id"] for r in before + during}
        assert {i.id for i in interaction_repo.iter_all(store)} == ids
        assert gw.gateway.capture.stats()["lost"] == 0
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
        store.dispose()


# --- several gateway processes on one PostgreSQL -------------------------------------------------------------------

_CAPTURE_CHILD = """
import json, sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from flywheel.serve.capture import Capture, Served
from flywheel.settings import load_settings
from flywheel.store.db import open_store

project, url, spill, ids = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
settings = load_settings(project, store={"url": url}, serve={"capture_batch": 16, "spill_dir": spill, "store_retry_s": 0.2})
store = open_store(settings, migrate=False)
capture = Capture(store, settings).start()
print("ready", flush=True)
sys.stdin.readline()  # the three writers start together
base = datetime(2026, 3, 1, tzinfo=timezone.utc)
for i in ids:
    capture.submit(Served(
        id=f"chatcmpl-shared-{i}", timestamp=base + timedelta(seconds=i), model_version="v1",
        messages=[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
        latency_ms=1.0, prompt_tokens=3, completion_tokens=2, user_id=f"user-{i % 7}", client=f"gw{sys.argv[5]}",
    ))
idle = capture.wait_idle(timeout=120, replayed=True)
capture.close()
print(json.dumps({"idle": idle, **capture.stats()}), flush=True)
store.dispose()
"""


def test_three_capture_processes_store_shared_ids_exactly_once(pg_url: str, project: Path, tmp_path: Path) -> None:
    """The gateway's writer in three processes at once on one PostgreSQL, as three gateways behind a load
    balancer run it. A third of the interactions reach all three (a retried request, a spill file replayed by
    one gateway while another still writes the same rows), in a different order in each process, in small
    batches so that the transactions interleave: each interaction ends up stored once, and nothing fails."""
    from conftest import _truncate_all

    _truncate_all(pg_url)
    open_store(load_settings(project, store={"url": pg_url})).dispose()  # migrated once, before the writers start
    shared = list(range(300))
    own = [list(range(1000 + 400 * k, 1400 + 400 * k)) for k in range(3)]
    # The writer takes up to 16 queued items per transaction: the same 16 shared ids go in at about the same
    # time in each process, in ascending, descending and scrambled order.
    blocks = [shared[start : start + 16] for start in range(0, len(shared), 16)]
    orders = [
        shared + own[0],
        [i for block in blocks for i in reversed(block)] + own[1],
        [i for block in blocks for i in block[1::2] + block[::2]] + own[2],
    ]
    script = tmp_path / "writer.py"
    script.write_text(_CAPTURE_CHILD, encoding="utf-8")
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(project), pg_url, str(tmp_path / f"spill{k}"), json.dumps(ids), str(k)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k, ids in enumerate(orders)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [json.loads(child.communicate(timeout=180)[0].strip().splitlines()[-1]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0, 0]
    assert all(r["idle"] and r["lost"] == 0 and r["rejected"] == 0 for r in results), results
    # no deadlock or other store error: the writers never had to fall back on their spill files
    assert [(r["store_errors"], r["spilled"]) for r in results] == [(0, 0)] * 3, results
    assert [r["stored"] for r in results] == [700, 700, 700]
    store = open_store(load_settings(project, store={"url": pg_url}), migrate=False)
    try:
        with store.engine.connect() as conn:
            stored = conn.execute(select(interactions.c.id, interactions.c.source)).fetchall()
    finally:
        store.dispose()
    expected = {f"chatcmpl-shared-{i}" for i in shared + own[0] + own[1] + own[2]}
    assert len(stored) == len(expected) == 1500 and {row.id for row in stored} == expected
    # each process's own interactions came from it; the shared ones from whichever wrote them first
    by_id = dict(stored)
    assert all(by_id[f"chatcmpl-shared-{i}"] == f"gateway:gw{k}" for k in range(3) for i in own[k])


def _race_row(interaction_id: str) -> dict[str, object]:
    from flywheel.data.pii import Scrubber
    from flywheel.data.rows import build_row

    flat = {"id": interaction_id, "messages": [{"role": "user", "content": "where is my parcel?"}], "model_version": "v1"}
    return build_row(flat, Scrubber(), 10_000, "gateway:gw0", utcnow())


def _applied_flags(store: Store) -> list[bool]:
    with store.engine.connect() as conn:
        return [bool(r.applied) for r in conn.execute(select(feedback_events.c.applied).order_by(feedback_events.c.id))]


def test_two_writers_inserting_one_interaction_apply_its_early_feedback_once(pg_url: str, project: Path) -> None:
    """Two gateways on one PostgreSQL replay the same interaction while feedback for it waits. Only the one
    whose insert stored the row applies it (the other's insert skips the row), so a follow-up is counted
    once. The interleaving is fixed by hand on two connections."""
    from flywheel.serve import feedback

    _truncate_all(pg_url)
    store = open_store(load_settings(project, store={"url": pg_url}))
    try:
        row = _race_row("chatcmpl-race")
        with store.begin() as conn:  # the feedback arrived first: stored, waiting for its interaction
            assert feedback.record(conn, [FeedbackItem(interaction_id="chatcmpl-race", kind="followup", value=2, client="unit")]) == 0
        assert _applied_flags(store) == [False]
        second = store.engine.connect()
        try:
            second.begin()  # opened before the first writer commits
            with store.begin() as first:
                assert feedback.insert_and_apply(first, [dict(row)]) == 1
            assert feedback.insert_and_apply(second, [dict(row)]) == 0  # the row is there now: skipped
            second.commit()
        finally:
            second.close()
        stored = interaction_repo.get(store, "chatcmpl-race")
        assert stored is not None and stored.signals.followups == 2 and _applied_flags(store) == [True]
        assert feedback_repo.sweep(store) == 0  # nothing left waiting: the sweep applies nothing twice
        stored = interaction_repo.get(store, "chatcmpl-race")
        assert stored is not None and stored.signals.followups == 2
    finally:
        store.dispose()


def test_feedback_stored_while_another_gateway_inserts_its_interaction_is_applied_once(pg_url: str, project: Path) -> None:
    """Gateway A's transaction inserts interaction X; before it commits, gateway B records feedback for X. B's
    update cannot see X and A looked for waiting events before B's event was there: nobody applied it (the
    event was lost before `applied` existed). The sweep applies it, once however often it runs."""
    from flywheel.serve import feedback

    _truncate_all(pg_url)
    store = open_store(load_settings(project, store={"url": pg_url}))
    try:
        a = store.engine.connect()
        try:
            a.begin()
            assert feedback.insert_and_apply(a, [_race_row("chatcmpl-lost")]) == 1  # not committed yet
            with store.begin() as b:
                assert feedback.record(b, [FeedbackItem(interaction_id="chatcmpl-lost", kind="followup", value=2, client="gw1")]) == 0
            a.commit()
        finally:
            a.close()
        stored = interaction_repo.get(store, "chatcmpl-lost")
        assert stored is not None and stored.signals.followups == 0 and _applied_flags(store) == [False]  # the lost event
        assert feedback_repo.sweep(store) == 1
        assert feedback_repo.sweep(store) == 0
        stored = interaction_repo.get(store, "chatcmpl-lost")
        assert stored is not None and stored.signals.followups == 2 and _applied_flags(store) == [True]
    finally:
        store.dispose()


def test_two_sweeps_at_once_apply_each_event_once(pg_url: str, project: Path) -> None:
    """Two gateways sweep at the same moment: the second skips the events the first holds instead of waiting
    for them, and finds none left once the first commits."""
    _truncate_all(pg_url)
    store = open_store(load_settings(project, store={"url": pg_url}))
    try:
        _waiting_event(store, "chatcmpl-swept", FeedbackItem(interaction_id="chatcmpl-swept", kind="followup", value=3, client="gw0"))
        first = store.engine.connect()
        try:
            first.begin()
            assert feedback_repo.apply_waiting(first, 10) == 1
            with store.begin() as second:
                assert feedback_repo.apply_waiting(second, 10) == 0  # held by the first: skipped, not waited for
            first.commit()
        finally:
            first.close()
        assert feedback_repo.sweep(store) == 0
        stored = interaction_repo.get(store, "chatcmpl-swept")
        assert stored is not None and stored.signals.followups == 3
    finally:
        store.dispose()


def _waiting_event(store: Store, interaction_id: str, item: FeedbackItem) -> None:
    """An event left unapplied although its interaction is stored: the state the race above leaves, made on
    one connection (SQLite serialises writers, so the race itself cannot happen there)."""
    from flywheel.serve import feedback

    with store.begin() as conn:
        assert feedback.record(conn, [item]) == 0
    with store.begin() as conn:
        interaction_repo.insert_ignore(conn, [_race_row(interaction_id)], set())  # stored without claiming its events


def test_triage_applies_waiting_feedback_before_it_captures(any_store: Store) -> None:
    from flywheel.context import Context
    from flywheel.data.triage import triage

    _waiting_event(any_store, "chatcmpl-late", FeedbackItem(interaction_id="chatcmpl-late", kind="thumbs_down", value=None, client="gw1"))
    ctx = Context(settings=any_store.settings, _store=any_store)
    try:
        summary = triage(ctx)
        again = triage(ctx)
    finally:
        if ctx._index is not None:
            ctx._index.close()
    assert (summary.feedback_applied, summary.captured, summary.by_rule) == (1, 1, {"thumbs_down": 1})
    assert (again.feedback_applied, again.captured) == (0, 0)
    stored = interaction_repo.get(any_store, "chatcmpl-late")
    assert stored is not None and stored.signals.feedback == "down" and _applied_flags(any_store) == [True]


def test_the_capture_writer_sweeps_waiting_feedback(any_store: Store, tmp_path: Path) -> None:
    _waiting_event(any_store, "chatcmpl-test-3", FeedbackItem(interaction_id="chatcmpl-test-3", kind="followup", value=2, client="gw1"))
    capture = Capture(any_store, serve_settings(any_store.settings, spill_dir=str(tmp_path / "spill"))).start()
    try:
        deadline = time.monotonic() + 30  # the first pass of the writer's loop sweeps
        while capture.stats()["feedback_swept"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        capture.submit(_served(3))  # the interaction again (a replay): stored already, applies nothing
        assert capture.wait_idle()
        swept = capture.stats()["feedback_swept"]
    finally:
        capture.close()
    stored = interaction_repo.get(any_store, "chatcmpl-test-3")
    assert swept == 1 and stored is not None and stored.signals.followups == 2 and _applied_flags(any_store) == [True]
