"""Ingest: mapping, PII scrubbing, idempotency, quarantine, interruption, export shapes and the CLI.

Store tests run on real SQLite and real PostgreSQL (`any_store`)."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import _truncate_all

from flywheel.cli import main
from flywheel.data import readers
from flywheel.data.formats import from_langfuse, from_langsmith
from flywheel.data.ingest import BATCH_ROWS, FileSummary, IngestSummary, _store_batch, ingest_files
from flywheel.data.pii import Scrubber
from flywheel.data.rows import build_row, content_hash
from flywheel.records import Interaction, interaction_hash, utcnow
from flywheel.settings import Settings, load_settings
from flywheel.settings_sections import PolicySettings
from flywheel.store import interactions as repo
from flywheel.store.db import Store, open_store
from flywheel.store.schema import metadata

FULL_LINE = {
    "id": "conv-001",
    "timestamp": "2026-01-05T10:00:00Z",
    "model_version": "support-v3",
    "task": "refund_request",  # `task` is an alias of `intent`
    "user_id": "u-42",
    "messages": [
        {"role": "system", "content": "You are ACME's support assistant."},
        {"role": "user", "content": "Refund order 12345 to card 4111 1111 1111 1111 please, mail jane.doe@example.com"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "refund", "arguments": '{"order_id": "12345", "email": "jane.doe@example.com"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "name": "refund", "content": '{"ok": true, "amount": "$45.10"}'},
        {"role": "assistant", "content": "Done: $45.10 goes back to your card within 5 days."},
    ],
    "feedback": "down",
    "escalated_to_human": True,
    "followups": 2,
    "qa_verdict": "Reject",
    "complaint": "Nobody called me back on +44 20 7946 0958",
    "user_tier": "enterprise",
}


def _write(path: Path, lines: list) -> Path:
    """Write JSON Lines; a str or bytes item is written as it is (to make bad lines)."""
    with open(path, "wb") as out:
        for item in lines:
            if isinstance(item, bytes):
                out.write(item + b"\n")
            elif isinstance(item, str):
                out.write(item.encode() + b"\n")
            else:
                out.write(json.dumps(item).encode() + b"\n")
    return path


def _line(i: int, **extra) -> dict:
    return {
        "id": f"c{i}",
        "timestamp": f"2026-02-01T00:00:{i % 60:02d}Z",
        "model_version": "v1",
        "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
        **extra,
    }


def _quarantine(settings: Settings) -> list[dict]:
    path = settings.quarantine_path
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def _with_max_chars(settings: Settings, chars: int) -> Settings:
    return settings.model_copy(update={"policies": PolicySettings(max_message_chars=chars)})


# --- one line, end to end ----------------------------------------------------------------------------------------


def test_a_full_line_is_scrubbed_stored_and_reads_back_as_a_record(any_store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "logs.jsonl", [FULL_LINE])
    summary = ingest_files(any_store, any_store.settings, [path])
    assert summary.clean and summary.files[0].stored == 1
    got = repo.get(any_store, "conv-001")
    assert isinstance(got, Interaction)
    assert got.intent == "refund_request" and got.user_id == "u-42" and got.model_version == "support-v3"
    assert got.signals.feedback == "down" and got.signals.escalated_to_human and got.signals.followups == 2
    assert got.signals.qa_verdict == "Reject" and got.signals.user_tier == "enterprise"
    assert got.messages[1].content == "Refund order 12345 to card [CARD] please, mail [EMAIL]"
    assert json.loads(got.messages[2].tool_calls[0].function.arguments) == {"order_id": "12345", "email": "[EMAIL]"}
    assert got.messages[3].tool_call_id == "call_1" and got.messages[3].name == "refund"
    assert got.signals.complaint == "Nobody called me back on [PHONE]"
    # the hash is the shared one, over the scrubbed content: what the gateway computes for the same turn
    assert got.content_hash == interaction_hash(got.messages, "u-42", "2026-01-05T10:00:00+00:00")
    assert got.source == "logs.jsonl:1"
    assert summary.files[0].pii == {"CARD": 1, "EMAIL": 2, "PHONE": 1}
    stored_text = json.dumps([m.model_dump() for m in got.messages])
    assert "jane.doe" not in stored_text and "4111" not in stored_text


def test_metadata_and_signals_may_be_nested_and_ids_and_times_may_be_missing(store: Store, tmp_path: Path) -> None:
    nested = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "metadata": {"intent": "greeting", "user_id": "jane@example.com", "timestamp": 1767225600},
        "signals": {"feedback": "up", "followups": 1},
    }
    no_time = {"messages": [{"role": "user", "content": "no time"}]}
    path = _write(tmp_path / "a.jsonl", [nested, no_time, no_time])
    summary = ingest_files(store, store.settings, [path])
    assert (summary.files[0].stored, summary.files[0].duplicates) == (2, 1)  # the same untimed turn counts once
    rows = {i.intent: i for i in repo.iter_all(store)}
    got = rows["greeting"]
    assert got.id == got.content_hash  # no id: the content hash is the id
    assert got.timestamp.isoformat() == "2026-01-01T00:00:00+00:00" and got.signals.feedback == "up"
    assert got.user_id.startswith("user-") and "@" not in got.user_id  # an e-mail as user id: a stable pseudonym


def test_content_hash_is_exactly_the_shared_interaction_hash() -> None:
    texts = [chr(c) for c in range(128)] + ["é ✓ \u2028 😀", 'quote " back \\ slash', "\x7f"]
    for text in texts:
        messages = [
            {"role": "user", "content": f"a{text}b"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": json.dumps({"k": text})}}],
            },
        ]
        for user in (None, "u1"):
            assert content_hash(messages, user, "2026-01-01T00:00:00+00:00") == interaction_hash(
                messages, user, "2026-01-01T00:00:00+00:00"
            )


# --- idempotency and duplicates ------------------------------------------------------------------------------------


def test_reingesting_the_same_file_adds_nothing(any_store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "logs.jsonl", [_line(i) for i in range(50)] + [_line(3)])  # one repeated line
    first = ingest_files(any_store, any_store.settings, [path], batch_rows=20)
    assert (first.files[0].read, first.files[0].stored, first.files[0].duplicates) == (51, 50, 1)
    again = ingest_files(any_store, any_store.settings, [path], batch_rows=20)
    assert (again.files[0].stored, again.files[0].duplicates) == (0, 51)
    assert repo.count(any_store) == 50
    # every stored row reads back through the pydantic records
    assert all(isinstance(i, Interaction) for i in repo.iter_all(any_store))


def test_same_content_under_another_id_is_a_duplicate(any_store: Store, tmp_path: Path) -> None:
    # "z-first" sorts after "a-later": the first line of the file keeps the content, whatever the ids
    path = _write(tmp_path / "a.jsonl", [{**_line(1), "id": "z-first"}, {**_line(1), "id": "a-later"}, _line(2), _line(2)])
    summary = ingest_files(any_store, any_store.settings, [path])
    assert (summary.files[0].stored, summary.files[0].duplicates, summary.files[0].quarantined) == (2, 2, 0)
    assert repo.get(any_store, "z-first") is not None and repo.get(any_store, "a-later") is None


def test_two_inserts_in_one_transaction_count_their_own_rows(any_store: Store) -> None:
    """Each insert counts only the rows it added, also when several share a transaction (on PostgreSQL they
    share its staging table)."""
    rows = [build_row(_line(i), Scrubber(), 1000, f"t:{i}", utcnow()) for i in range(5)]
    with any_store.begin() as conn:
        assert repo.insert_ignore(conn, rows[:3]) == 3
        assert repo.insert_ignore(conn, rows[2:]) == 2  # rows[2] is already stored
        assert repo.insert_ignore(conn, []) == 0
    with any_store.begin() as conn:
        assert repo.insert_ignore(conn, rows) == 0
    assert repo.count(any_store) == 5


def test_values_postgres_refuses_are_quarantined_and_the_connection_goes_on(pg_url: str, project: Path, tmp_path: Path) -> None:
    """The COPY refuses a value the column cannot hold (DataError, where SQLite would store it): that row is
    quarantined, its batch neighbours are stored, and the next batches on the same connection are stored too."""
    _truncate_all(pg_url)
    store = open_store(load_settings(project, store={"url": pg_url}))
    try:
        rows = [build_row(_line(i), Scrubber(), 1000, f"t.jsonl:{i}", utcnow()) for i in range(6)]
        rows[1]["intent"] = "x" * 201  # the column holds 200 characters
        rows[4]["followups"] = 2**40  # an integer column
        values = repo.plan_for("postgresql").values(rows)
        with store.engine.connect() as conn:
            first = _store_batch(conn, values[:3], [1, 2, 3], since=utcnow())
            second = _store_batch(conn, values[3:], [4, 5, 6], since=utcnow())
            third = _store_batch(conn, values[:3], [1, 2, 3], since=utcnow())  # again: duplicates, and the same refusal
        assert (first[0], [(bad.line, bad.kind) for bad in first[1]]) == (2, [(2, "store_refused")])
        assert (second[0], [(bad.line, bad.kind) for bad in second[1]]) == (2, [(5, "store_refused")])
        assert "too long" in first[1][0].reason and "out of range" in second[1][0].reason
        assert (third[0], [bad.line for bad in third[1]]) == (0, [2])
        assert sorted(i.id for i in repo.iter_all(store)) == ["c0", "c2", "c3", "c5"]
    finally:
        store.dispose()


def test_sqlite_and_postgres_store_the_same_records(pg_url: str, project: Path, tmp_path: Path) -> None:
    """The two bulk paths (sqlite3 executemany, PostgreSQL COPY) read back as the same records."""
    lines = [FULL_LINE, {**FULL_LINE, "id": "conv-002", "messages": [{"role": "user", "content": "Grüße, ça va? 日本 \\ \t tab"}]}]
    lines += [_line(i, latency_ms=12.5, prompt_tokens=7, completion_tokens=3, user_tier="pro") for i in range(20)]
    lines += [{"messages": [{"role": "user", "content": "no id, no time"}, {"role": "assistant", "content": "ok"}]}]
    path = _write(tmp_path / "same.jsonl", lines)
    _truncate_all(pg_url)
    got = []
    for overrides in ({}, {"store": {"url": pg_url}}):
        settings = load_settings(project, **overrides)
        store = open_store(settings)
        try:
            assert ingest_files(store, settings, [path], batch_rows=7).files[0].stored == len(lines)
            got.append({i.id: i for i in repo.iter_all(store)})
        finally:
            store.dispose()
    sqlite_rows, postgres_rows = got
    untimed = [i for i in sqlite_rows.values() if i.source.endswith(f":{len(lines)}")]
    assert len(untimed) == 1  # stored with the ingest time: that differs between the two runs
    untimed_id = untimed[0].id
    assert sqlite_rows.keys() == postgres_rows.keys()
    for key, item in sqlite_rows.items():
        other = postgres_rows[key]
        if key == untimed_id:
            item, other = item.model_copy(update={"timestamp": None}), other.model_copy(update={"timestamp": None})
        assert item.model_dump() == other.model_dump(), key


def test_an_id_reused_with_other_content_is_a_conflict_naming_the_earlier_line(any_store: Store, tmp_path: Path) -> None:
    other = {**_line(2), "id": "c1"}  # c1 again, with line 2's conversation
    # batch_rows=3: line 3 conflicts with a row of its own batch, line 5 with one of the batch before
    path = _write(tmp_path / "a.jsonl", [_line(1), _line(4), other, _line(1), other])
    summary = ingest_files(any_store, any_store.settings, [path], batch_rows=3)
    f = summary.files[0]
    assert (f.read, f.stored, f.duplicates, f.conflicts, f.quarantined) == (5, 2, 1, 2, 2)
    assert f.reasons == {"id_conflict": 2} and not summary.clean
    quarantined = _quarantine(any_store.settings)
    assert [(q["line"], q["kind"]) for q in quarantined] == [(3, "id_conflict"), (5, "id_conflict")]
    assert {q["reason"] for q in quarantined} == {"id 'c1' was already used by line 1 of this file, with different content"}
    assert "answer 2" in quarantined[0]["raw"]  # the conflicting copy, the one not stored
    assert repo.get(any_store, "c1").messages[0].content == "question 1"  # the first copy keeps the id

    # a later file reusing the id: the stored copy's file and line, from an earlier ingest
    later = _write(tmp_path / "b.jsonl", [{**_line(3), "id": "c4"}])
    f = ingest_files(any_store, any_store.settings, [later]).files[0]
    assert (f.stored, f.duplicates, f.conflicts) == (0, 0, 1)
    assert (
        _quarantine(any_store.settings)[-1]["reason"]
        == "id 'c4' is already stored with different content (from a.jsonl:2, an earlier ingest)"
    )


def test_an_id_conflict_with_a_row_of_unknown_origin_says_already_stored(store: Store, tmp_path: Path) -> None:
    row = build_row(_line(7), Scrubber(), 1000, "", utcnow())  # no source, as rows from before sources were kept
    with store.begin() as conn:
        assert repo.insert_ignore(conn, [row]) == 1
    path = _write(tmp_path / "a.jsonl", [{**_line(8), "id": "c7"}])
    f = ingest_files(store, store.settings, [path]).files[0]
    assert f.conflicts == 1
    assert _quarantine(store.settings)[0]["reason"] == "id 'c7' is already stored with different content"


def test_reingesting_does_not_quarantine_the_same_bad_lines_again(any_store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", [_line(1), "{oops", {"messages": [{"role": "robot", "content": "x"}]}, {**_line(2), "id": "c1"}])
    first = ingest_files(any_store, any_store.settings, [path])
    assert (first.files[0].quarantined, first.files[0].already_quarantined, first.clean) == (3, 0, False)
    again = ingest_files(any_store, any_store.settings, [path, path])  # twice in one run, too
    assert [(f.quarantined, f.already_quarantined, f.duplicates) for f in again.files] == [(0, 3, 1), (0, 3, 1)]
    assert again.clean and len(_quarantine(any_store.settings)) == 3

    # a new bad line in the grown file is quarantined; the line that changed at line 2 is new as well
    with open(path, "a", encoding="utf-8") as out:
        out.write("[1]\n")
    grown = path.read_text(encoding="utf-8").replace("{oops", "{oops!", 1)
    path.write_text(grown, encoding="utf-8")
    third = ingest_files(any_store, any_store.settings, [path]).files[0]
    assert (third.quarantined, third.already_quarantined) == (2, 2)
    assert [(q["line"], q["kind"]) for q in _quarantine(any_store.settings)[3:]] == [(2, "malformed_json"), (5, "wrong_type")]


# --- bad input ---------------------------------------------------------------------------------------------------


def test_each_kind_of_bad_line_is_quarantined_with_its_line_and_the_rest_is_stored(any_store: Store, tmp_path: Path) -> None:
    settings = _with_max_chars(any_store.settings, 200)
    path = _write(
        tmp_path / "mixed.jsonl",
        [
            _line(1),  # 1 good
            '{"messages": [{"role": "user", "content": "hi"}',  # 2 malformed JSON
            _line(3, followups="three"),  # 3 wrong type
            {"messages": [{"role": "robot", "content": "beep"}]},  # 4 unknown role
            {"messages": [{"role": "user", "content": "x" * 201}]},  # 5 oversized message
            b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # 6 invalid UTF-8
            "",  # 7 blank: skipped, not counted
            "[1, 2, 3]",  # 8 not an object
            '{"messages": [{"role": "user", "content": "a\\u0000b"}]}',  # 9 NUL
            {"messages": [{"role": "user", "content": "mail me: bob@example.com"}], "feedback": "meh"},  # 10 wrong value
            {"foo": 1},  # 11 no known shape
            _line(12),  # 12 good
            _line(13, timestamp=10**30),  # 13 epoch out of range
            _line(14, prompt_tokens=2**70),  # 14 too big for the column
        ],
    )
    summary = ingest_files(any_store, settings, [path])
    f = summary.files[0]
    assert (f.read, f.stored, f.quarantined) == (13, 2, 11)
    got = {(q["line"], q["kind"]) for q in _quarantine(settings)}
    assert got == {
        (2, "malformed_json"),
        (3, "wrong_type"),
        (4, "unknown_role"),
        (5, "oversized"),
        (6, "invalid_utf8"),
        (8, "wrong_type"),
        (9, "nul_character"),
        (10, "wrong_value"),
        (11, "unmappable"),
        (13, "bad_timestamp"),
        (14, "wrong_type"),
    }
    by_line = {q["line"]: q for q in _quarantine(settings)}
    assert by_line[3]["reason"] == "followups must be a whole number from 0 to 2147483647, got 'three'"
    assert by_line[4]["reason"].startswith("messages[0].role 'robot'")
    assert "max_message_chars (200)" in by_line[5]["reason"]
    assert by_line[6]["raw"].endswith('caf\\xe9"}]}')  # the bytes shown, not guessed
    assert "bob@example.com" not in by_line[10]["raw"] and "[EMAIL]" in by_line[10]["raw"]  # quarantine is scrubbed too
    assert all(q["file"] == str(path) for q in _quarantine(settings))
    assert repo.count(any_store) == 2


def test_an_oversized_line_is_skipped_without_reading_it_whole(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 4096)  # the giant line spans many chunks
    settings = _with_max_chars(store.settings, 100)  # lines over 1 MB are refused before parsing
    giant = json.dumps({"messages": [{"role": "user", "content": "y" * (3 << 20)}]})
    path = _write(tmp_path / "big.jsonl", [_line(1), giant, _line(3)])
    summary = ingest_files(store, settings, [path])
    assert (summary.files[0].stored, summary.files[0].quarantined) == (2, 1)
    assert [(q["line"], q["kind"]) for q in _quarantine(settings)] == [(2, "oversized")]


def test_the_store_refusing_a_row_quarantines_that_row_only(any_store: Store) -> None:
    rows = [build_row(_line(i), Scrubber(), 1000, f"t:{i}", utcnow()) for i in range(3)]
    rows[1]["model_version"] = None  # NOT NULL: the database refuses it
    stored, refused = _store_batch_on(any_store, rows)
    assert stored == 2 and [(r.line, r.kind) for r in refused] == [(1, "store_refused")]
    assert repo.count(any_store) == 2


def _store_batch_on(store: Store, rows: list[dict]):
    with store.engine.connect() as conn:
        return _store_batch(conn, repo.plan_for(conn.dialect.name).values(rows), list(range(len(rows))), since=utcnow())


# --- file shapes -------------------------------------------------------------------------------------------------


def test_gzip_files_json_arrays_and_chunk_boundaries_read_the_same(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "CHUNK_BYTES", 97)  # lines split across many chunk boundaries
    lines = [_line(i) for i in range(40)]
    plain = _write(tmp_path / "a.jsonl", lines[:20])
    zipped = tmp_path / "b.jsonl.gz"
    zipped.write_bytes(gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines[20:30])))
    array = tmp_path / "c.json"
    array.write_text(json.dumps(lines[30:]), encoding="utf-8")
    summary = ingest_files(store, store.settings, [plain, zipped, array])
    assert [f.stored for f in summary.files] == [20, 10, 10] and summary.clean
    assert repo.count(store) == 40


def test_a_broken_json_array_keeps_what_came_before_the_break(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("[" + json.dumps(_line(1)) + ", " + json.dumps(_line(2)) + ', {"messages": [oops', encoding="utf-8")
    summary = ingest_files(store, store.settings, [path])
    assert summary.files[0].stored == 2 and summary.files[0].quarantined == 1
    assert _quarantine(store.settings)[0]["reason"].startswith("item 3:")


# --- exports: LangSmith runs and Langfuse traces -------------------------------------------------------------------

LANGSMITH_RUN = {
    "id": "497f6eca-6276-4993-bfeb-53cbbbba6f08",
    "name": "ChatOpenAI",
    "run_type": "llm",
    "start_time": "2026-01-05T10:00:00.090000",
    "end_time": "2026-01-05T10:00:01.459000",
    "inputs": {
        "messages": [
            [
                {
                    "lc": 1,
                    "type": "constructor",
                    "id": ["langchain", "schema", "messages", "SystemMessage"],
                    "kwargs": {"content": "Be brief.", "type": "system"},
                },
                {
                    "lc": 1,
                    "type": "constructor",
                    "id": ["langchain", "schema", "messages", "HumanMessage"],
                    "kwargs": {"content": "Where is order 555? Reach me at ann@example.org", "type": "human"},
                },
            ]
        ]
    },
    "outputs": {
        "generations": [
            [
                {
                    "text": "",
                    "type": "ChatGeneration",
                    "message": {
                        "lc": 1,
                        "type": "constructor",
                        "id": ["langchain", "schema", "messages", "AIMessage"],
                        "kwargs": {
                            "content": "",
                            "type": "ai",
                            "tool_calls": [{"name": "lookup_order", "args": {"order_id": "555"}, "id": "call_9", "type": "tool_call"}],
                        },
                    },
                }
            ]
        ],
        "llm_output": {"model_name": "gpt-4o-mini"},
    },
    "extra": {
        "metadata": {"ls_model_name": "gpt-4o-mini", "intent": "order_status", "user_id": "u-7", "user_tier": "pro"},
        "invocation_params": {"model": "gpt-4o-mini"},
    },
    "feedback_stats": {"user_score": {"n": 1, "avg": 0.0}, "qa_verdict": {"n": 2, "avg": None, "values": {"Reject": 2}}},
    "tags": ["prod"],
    "prompt_tokens": 31,
    "completion_tokens": 12,
}

LANGFUSE_TRACE = {
    "id": "trace-abc",
    "timestamp": "2026-01-05T10:00:00.000Z",
    "name": "support-chat",
    "input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Cancel my plan, card 5555 5555 5555 4444"}],
    "output": {"role": "assistant", "content": "Your plan is cancelled."},
    "userId": "user-99",
    "sessionId": "s-1",
    "release": "2026.01",
    "version": "support-v4",
    "metadata": {"intent": "cancel_subscription", "user_tier": "enterprise"},
    "tags": ["prod"],
    "latency": 1.25,
    "scores": [
        {"id": "s1", "traceId": "trace-abc", "name": "user-feedback", "value": 0, "dataType": "NUMERIC", "source": "API"},
        {
            "id": "s2",
            "traceId": "trace-abc",
            "name": "qa_verdict",
            "stringValue": "Risk",
            "dataType": "CATEGORICAL",
            "source": "ANNOTATION",
        },
        {"id": "s3", "traceId": "trace-abc", "name": "escalated", "value": 1, "dataType": "BOOLEAN", "source": "API"},
        {"id": "s4", "traceId": "trace-abc", "name": "complaint", "value": 1, "comment": "Charged after cancelling", "dataType": "BOOLEAN"},
    ],
}


def test_a_langsmith_run_maps_onto_the_interaction(any_store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "runs.jsonl", [LANGSMITH_RUN])
    summary = ingest_files(any_store, any_store.settings, [path], fmt="langsmith")
    assert summary.clean and summary.files[0].formats == {"langsmith": 1}
    got = repo.get(any_store, LANGSMITH_RUN["id"])
    assert [m.role for m in got.messages] == ["system", "user", "assistant"]
    assert got.messages[1].content == "Where is order 555? Reach me at [EMAIL]"
    call = got.messages[2].tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_9", "lookup_order", {"order_id": "555"})
    assert got.messages[2].content is None
    assert (got.model_version, got.intent, got.user_id, got.signals.user_tier) == ("gpt-4o-mini", "order_status", "u-7", "pro")
    assert got.signals.feedback == "down" and got.signals.qa_verdict == "Reject"
    assert (got.prompt_tokens, got.completion_tokens) == (31, 12)
    assert got.timestamp.isoformat() == "2026-01-05T10:00:00.090000+00:00"
    assert got.source == "langsmith:runs.jsonl:1"


def test_a_langsmith_run_of_the_openai_wrapper_maps_too() -> None:
    run = {
        "id": "r2",
        "run_type": "llm",
        "start_time": "2026-01-05T10:00:00",
        "inputs": {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"},
        "outputs": {"choices": [{"message": {"role": "assistant", "content": "hello"}}]},
        "feedback_stats": {"thumbs": {"n": 3, "avg": 1.0}, "escalated_to_human": {"n": 1, "avg": 1.0}},
    }
    flat = from_langsmith(run)
    assert flat["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert flat["feedback"] == "up" and flat["escalated_to_human"] is True


def test_a_langfuse_trace_maps_onto_the_interaction(any_store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "traces.jsonl", [LANGFUSE_TRACE])
    summary = ingest_files(any_store, any_store.settings, [path])  # auto-detected
    assert summary.clean and summary.files[0].formats == {"langfuse": 1}
    got = repo.get(any_store, "trace-abc")
    assert [m.role for m in got.messages] == ["system", "user", "assistant"]
    assert got.messages[1].content == "Cancel my plan, card [CARD]"
    assert (got.model_version, got.intent, got.user_id, got.signals.user_tier) == (
        "support-v4",
        "cancel_subscription",
        "user-99",
        "enterprise",
    )
    assert got.signals.feedback == "down" and got.signals.qa_verdict == "Risk" and got.signals.escalated_to_human
    assert got.signals.complaint == "Charged after cancelling"
    assert got.latency_ms == 1250.0


def test_a_langfuse_blob_export_row_maps_too() -> None:
    row = {
        "id": "t2",
        "timestamp": "2024-05-29 13:46:19.963000",
        "user_id": "u1",
        "input": "What is the warranty?",
        "output": "Two years.",
        "metadata": '{"intent": "product_info"}',
        "scores": {"user-feedback": 1},
    }
    flat = from_langfuse(row)
    assert flat["messages"] == [{"role": "user", "content": "What is the warranty?"}, {"role": "assistant", "content": "Two years."}]
    assert (flat["user_id"], flat["intent"], flat["feedback"]) == ("u1", "product_info", "up")


def test_auto_detects_each_line_of_a_mixed_file(store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed.jsonl", [FULL_LINE, LANGSMITH_RUN, LANGFUSE_TRACE])
    summary = ingest_files(store, store.settings, [path])
    assert summary.files[0].formats == {"openai": 1, "langsmith": 1, "langfuse": 1} and summary.files[0].stored == 3


def test_a_forced_format_quarantines_lines_of_another_shape(store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed.jsonl", [LANGFUSE_TRACE, {"foo": 1}])
    summary = ingest_files(store, store.settings, [path], fmt="langsmith")
    assert summary.files[0].quarantined == 2 and summary.files[0].stored == 0
    assert {q["kind"] for q in _quarantine(store.settings)} == {"unmappable"}


# --- interruption --------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import multiprocessing
    import sys
    from pathlib import Path
    from flywheel.data.ingest import ingest_files
    from flywheel.settings import load_settings
    from flywheel.store.db import open_store

    if __name__ == "__main__":
        project, url, path, parallel = sys.argv[1:5]
        settings = load_settings(project, **({"store": {"url": url}} if url else {}))
        store = open_store(settings)
        def progress(f):  # the rows stored so far, then the helper process's pid
            print(f.stored, *(p.pid for p in multiprocessing.active_children()), flush=True)
        ingest_files(store, settings, [Path(path)], batch_rows=500, parallel=parallel == "1", on_progress=progress)
        print("done", flush=True)
""")


def _gone(pid: int) -> bool:
    """The process has ended (an ended orphan may linger as a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_a_killed_ingest_loses_nothing_it_reported_and_a_rerun_completes_it(any_store: Store, tmp_path: Path, parallel: bool) -> None:
    total = 12_000
    path = _write(tmp_path / "many.jsonl", [_line(i) for i in range(total)])
    script = tmp_path / "child.py"
    script.write_text(_CHILD, encoding="utf-8")
    url = any_store.settings.store.url
    child = subprocess.Popen(
        [sys.executable, str(script), str(any_store.settings.project_dir), url, str(path), "1" if parallel else "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    reported = 0
    helpers: set[int] = set()
    for out in child.stdout:
        if out.strip() == "done":
            break
        reported, *pids = map(int, out.split())
        helpers.update(pids)
        if reported >= 1000:
            child.send_signal(signal.SIGKILL)  # mid-file, between or during commits: no chance to clean up
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    after_kill = repo.count(any_store)
    assert reported <= after_kill < total  # everything reported is there; the file was not finished
    assert bool(helpers) == parallel
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in helpers), "the helper process outlived the killed ingest"
    rerun = ingest_files(any_store, any_store.settings, [path])
    assert repo.count(any_store) == total  # exactly: nothing lost, nothing twice
    assert (rerun.files[0].stored, rerun.files[0].duplicates) == (total - after_kill, after_kill)


# --- the helper process and the serial path agree -------------------------------------------------------------------


def _everything_stored(store: Store, summary: IngestSummary) -> tuple:
    """What an ingest leaves behind: its counts, every stored row and every quarantine entry."""
    rows = [i.model_dump(mode="json") for i in repo.iter_all(store)]
    quarantined = [{k: v for k, v in entry.items() if k != "at"} for entry in _quarantine(store.settings)]
    return summary.files[0].model_dump(exclude={"path"}), rows, quarantined


def test_the_parallel_path_stores_exactly_what_the_serial_path_stores(any_store: Store, tmp_path: Path) -> None:
    mail = {"role": "user", "content": "mail me at jane.doe@example.com or call +44 20 7946 0958, Ann Smith"}
    lines: list = [_line(i) for i in range(40)]
    lines[7]["messages"].append(mail)
    lines += ["not json", "", b"\xff\xfe", "[1]", {"messages": [{"role": "robot", "content": "x"}]}, FULL_LINE]
    lines += [_line(3), {**_line(5), "id": "other-5"}, {**_line(70), "id": "c4"}, _line(41, messages=[mail])]
    lines += [_line(i) for i in range(42, 60)] + ["{oops", {**_line(99), "id": "c45"}, _line(45)]
    path = _write(tmp_path / "mixed.jsonl", lines)
    results = []
    for parallel in (False, True):
        helpers: list[str] = []

        def seen(_: FileSummary, helpers: list[str] = helpers) -> None:
            helpers.extend(p.name for p in multiprocessing.active_children())

        summary = ingest_files(
            any_store,
            any_store.settings,
            [path],
            batch_rows=4,  # many chunks, the helper's and this process's in turn, each with a bad line or a duplicate
            parallel=parallel,
            on_progress=seen,
        )
        assert ("flywheel-ingest-parser" in helpers) == parallel and not multiprocessing.active_children()
        results.append(_everything_stored(any_store, summary))
        with any_store.engine.begin() as conn:  # empty again for the other path
            for table in reversed(metadata.sorted_tables):
                conn.execute(table.delete())
        any_store.settings.quarantine_path.unlink()
    assert results[0] == results[1]
    counts = results[0][0]
    assert (counts["stored"], counts["duplicates"], counts["conflicts"]) == (60, 3, 2)
    assert counts["reasons"] == {"malformed_json": 2, "invalid_utf8": 1, "wrong_type": 1, "unknown_role": 1, "id_conflict": 2}
    assert counts["pii"]["EMAIL"] == 4 and counts["pii"]["PERSON"] >= 2  # two in FULL_LINE, one each in lines 8 and 50


def test_the_helper_process_ends_with_a_failing_or_interrupted_ingest(store: Store, tmp_path: Path) -> None:
    path = _write(tmp_path / "x.jsonl", [_line(i) for i in range(100)])
    for stop in (RuntimeError("the store is gone"), KeyboardInterrupt()):

        def progress(_: FileSummary, stop: BaseException = stop) -> None:
            assert multiprocessing.active_children()
            raise stop

        with pytest.raises(type(stop)):
            ingest_files(store, store.settings, [path], batch_rows=10, parallel=True, on_progress=progress)
        assert not multiprocessing.active_children()
    assert repo.count(store) == 10  # the first batch, committed before its progress report


# --- the command -------------------------------------------------------------------------------------------------


def test_cli_exit_codes_and_json_summary(project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path / "good.jsonl", [_line(i) for i in range(5)])
    assert main(["-C", str(project), "ingest", str(good)]) == 0
    out = capsys.readouterr().out
    assert "stored 5, duplicates 0, quarantined 0" in out

    assert main(["-C", str(project), "ingest", str(good), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == {
        "read": 5,
        "stored": 0,
        "duplicates": 5,
        "quarantined": 0,
        "conflicts": 0,
        "already_quarantined": 0,
        "failed_files": 0,
    }

    bad = _write(tmp_path / "bad.jsonl", [_line(10), "{oops"])
    assert main(["-C", str(project), "ingest", str(bad), str(tmp_path / "missing.jsonl"), str(good)]) == 2
    captured = capsys.readouterr()
    assert "bad.jsonl: read 2, stored 1, duplicates 0, quarantined 1 (malformed_json 1)" in captured.out
    assert "missing.jsonl: file not found" in captured.err
    assert "good.jsonl: read 5, stored 0, duplicates 5" in captured.out  # files after a missing one still run

    # the same bad file again: nothing new is bad, so exit 0, and the summary says where the old ones are
    assert main(["-C", str(project), "ingest", str(bad)]) == 0
    captured = capsys.readouterr()
    assert "bad.jsonl: read 2, stored 0, duplicates 1, quarantined 0, already quarantined 1" in captured.out
    assert "1 bad line(s) already quarantined earlier (see " in captured.err

    conflict = _write(tmp_path / "conflict.jsonl", [{**_line(11), "id": "c10"}])
    assert main(["-C", str(project), "ingest", str(conflict)]) == 2
    captured = capsys.readouterr()
    assert "quarantined 1 (id_conflict 1)" in captured.out
    assert "1 line(s) quarantined (1 reuse a stored id with different content); see " in captured.err

    assert main(["-C", str(project), "ingest", str(good), "--format", "csv"]) == 2
    assert "--format 'csv'" in capsys.readouterr().err
    assert BATCH_ROWS == 2000
