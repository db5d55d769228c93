"""`flywheel failures` (list, filters, counts, show), `flywheel label` on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.data.labels import add_label, count_labels, latest_label
from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import Correction, Failure, FailureStatus, Interaction, Message, SampleTier, Signals, Verdict, Verification
from flywheel.store import failures as repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store

# (interaction id, intent, model version, rule, risk, status, verdict (problem type, severity) or None)
ROWS = [
    ("i0", "card_arrival", "v1", "qa_reject", 5.0, FailureStatus.JUDGED, ("wrong_intent", "medium")),
    ("i1", "refund_status", "v1", "complaint", 3.5, FailureStatus.JUDGED, ("over_promise", "high")),
    ("i2", "refund_status", "v2", "thumbs_down", 1.0, FailureStatus.JUDGED, ("over_promise", "high")),
    ("i3", "card_arrival", "v2", "escalation", 3.0, FailureStatus.NOT_FAILURE, None),
    ("i4", "lost_card", "v2", "thumbs_down", 1.0, FailureStatus.TRIAGED, None),
]


def fid(interaction_id: str) -> str:
    return repo.failure_id_for(interaction_id)


def seed(store: Store) -> None:
    interaction_repo.insert(
        store,
        [
            Interaction(
                id=iid,
                timestamp="2026-01-02T03:04:05Z",
                model_version=version,
                intent=intent,
                messages=[
                    Message(role="user", content=f"question {iid} about {intent}"),
                    Message(role="assistant", content=f"answer {iid} [not markup]"),
                ],
                signals=Signals(feedback="down", user_tier="premium"),
                content_hash=f"h-{iid}",
                source=f"log.jsonl:{n + 1}",
            )
            for n, (iid, intent, version, *_rest) in enumerate(ROWS)
        ],
    )
    with store.begin() as conn:
        repo.insert_failures(
            conn,
            [
                Failure(
                    id=fid(iid),
                    interaction_id=iid,
                    rule=rule,
                    rules=[rule],
                    risk=risk,
                    first_seen_version=version,
                    intent=intent,
                    status=FailureStatus.TRIAGED,
                )
                for iid, intent, version, rule, risk, *_rest in ROWS
            ],
        )
        for iid, _intent, _version, _rule, _risk, status, verdict in ROWS:
            if verdict is not None:
                repo.save_verdict(
                    conn,
                    Verdict(
                        failure_id=fid(iid),
                        is_failure=True,
                        problem_type=verdict[0],
                        severity=verdict[1],
                        acceptance="Reject",
                        rationale="wrong",
                        judge="rule",
                        prompt_version="judge@abc",
                    ),
                )
            elif status == FailureStatus.NOT_FAILURE:
                repo.save_verdict(conn, Verdict(failure_id=fid(iid), is_failure=False, judge="rule"))
        repo.save_correction(
            conn,
            Correction(
                failure_id=fid("i1"),
                answer="Refunds take 5-7 business days.",
                generator="kb",
                context_ids=["kb/refund-approved"],
                verification=Verification(passed=True, verifier="rule"),
            ),
        )
        repo.save_correction(
            conn,
            Correction(
                failure_id=fid("i2"),
                answer="We guarantee your refund today.",
                generator="llm:test-model",
                prompt_version="corrector@123",
                verification=Verification(
                    passed=False, reasons=["policy:guaranteed_refund: over_promise (high)"], verifier="rule+llm:test-model"
                ),
            ),
        )
        repo.move_tier(conn, fid("i1"), SampleTier.CANDIDATE, actor="test", reason="fixed in v2", version="v2", weight=1.0)


def run(capsys: pytest.CaptureFixture[str], project: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["-C", str(project), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def seeded(any_store: Store, project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A seeded store; the CLI, which builds its own settings, is pointed at the same database."""
    if any_store.settings.store.url:
        monkeypatch.setenv("FLYWHEEL_STORE__URL", any_store.settings.store.url)
    monkeypatch.setenv("COLUMNS", "220")  # rich tables: no truncated ids
    seed(any_store)
    return project


def test_list_filters_and_json(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, seeded, "failures", "--json")
    assert code == 0
    rows = json.loads(out)
    # highest risk first, every non-duplicate failure
    assert [r["id"] for r in rows] == [fid(r[0]) for r in sorted(ROWS, key=lambda r: (-r[4], fid(r[0])))]
    by_id = {r["id"]: r for r in rows}
    assert by_id[fid("i1")]["verified"] is True and by_id[fid("i1")]["status"] == "verified"
    assert by_id[fid("i2")]["verified"] is False and by_id[fid("i2")]["status"] == "corrected"
    assert by_id[fid("i1")]["tier"] == "candidate_baseline"

    def ids(*flags: str) -> set[str]:
        code, out, _ = run(capsys, seeded, "failures", *flags, "--json")
        assert code == 0
        return {r["id"] for r in json.loads(out)}

    assert ids("--problem-type", "over_promise") == {fid("i1"), fid("i2")}
    assert ids("--problem-type", "over_promise", "--version", "v2") == {fid("i2")}
    assert ids("--severity", "medium") == {fid("i0")}
    assert ids("--intent", "card_arrival") == {fid("i0"), fid("i3")}
    assert ids("--status", "triaged") == {fid("i4")}
    assert ids("--rule", "complaint") == {fid("i1")}
    assert ids("--tier", "candidate_baseline") == {fid("i1")}
    assert len(ids("--limit", "2")) == 2

    code, out, _ = run(capsys, seeded, "failures", "--problem-type", "over_promise")
    assert code == 0
    assert "2 failure(s)" in out and fid("i1") in out and fid("i2") in out and fid("i0") not in out


def test_bad_filter_values_are_one_clear_error(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, seeded, "failures", "--severity", "huge")
    assert code == 2 and "--severity 'huge' is not one of: low, medium, high, critical" in err
    code, _, err = run(capsys, seeded, "failures", "--problem-type", "nonsense")
    assert code == 2 and "--problem-type 'nonsense'" in err and "wrong_intent" in err
    code, _, err = run(capsys, seeded, "failures", "counts", "--by", "problem_type,colour")
    assert code == 2 and "--by field 'colour'" in err


def test_counts_table_and_json(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, seeded, "failures", "counts", "--json")
    assert code == 0
    got = {(r["problem_type"], r["severity"]): (r["failures"], r["frequency"]) for r in json.loads(out)}
    assert got == {("over_promise", "high"): (2, 2), ("wrong_intent", "medium"): (1, 1), (None, None): (2, 2)}
    code, out, _ = run(capsys, seeded, "failures", "counts", "--by", "intent", "--json")
    assert {r["intent"]: r["failures"] for r in json.loads(out)} == {"card_arrival": 2, "refund_status": 2, "lost_card": 1}
    code, out, _ = run(capsys, seeded, "failures", "counts", "--by", "first_seen_version,status")
    assert code == 0 and "first_seen_version" in out and "over_promise" not in out and "verified" in out


def test_show_prints_everything_known(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, seeded, "failures", "show", fid("i2"), "--json")
    assert code == 0
    view = json.loads(out)
    assert view["failure"]["rule"] == "thumbs_down" and view["failure"]["first_seen_version"] == "v2"
    assert [m["role"] for m in view["interaction"]["messages"]] == ["user", "assistant"]
    assert view["verdict"]["problem_type"] == "over_promise" and view["verdict"]["prompt_version"] == "judge@abc"
    assert view["correction"]["generator"] == "llm:test-model" and view["correction"]["prompt_version"] == "corrector@123"
    assert view["correction"]["verification"]["reasons"] == ["policy:guaranteed_refund: over_promise (high)"]
    assert view["reference"] is None

    code, out, _ = run(capsys, seeded, "failures", "show", fid("i1"))
    assert code == 0
    for text in (
        fid("i1"),
        "status verified",
        "rule complaint",
        "first seen in v1",
        "question i1 about refund_status",
        "answer i1 [not markup]",  # logged text is printed, never read as rich markup
        "over_promise (high)",
        "judge rule, prompt judge@abc",
        "verified; generator kb",
        "Refunds take 5-7 business days.",
        "kb/refund-approved",
        "problem -> candidate_baseline by test at v2 (fixed in v2)",
    ):
        assert text in out, text


def test_unknown_id_exits_3(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, seeded, "failures", "show", "f-nope")
    assert code == NotFoundError.exit_code == 3
    assert "no failure with id 'f-nope'" in err
    code, _, err = run(capsys, seeded, "label", "f-nope", "--intent", "card_arrival")
    assert code == 3


def test_label_one_and_show_it(seeded: Path, any_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, seeded, "label", fid("i0"), "--intent", "lost_card", "--answer", "Freeze the card in the app.", "--by", "ann"
    )
    assert code == 0 and "labelled" in out and "1 label(s) in all" in out
    with any_store.engine.connect() as conn:
        ref = latest_label(conn, fid("i0"))
    assert ref is not None and ref.intent == "lost_card" and ref.answer == "Freeze the card in the app." and ref.source == "label:ann"
    code, out, _ = run(capsys, seeded, "failures", "show", fid("i0"), "--json")
    assert json.loads(out)["reference"] == {
        "intent": "lost_card",
        "answer": "Freeze the card in the app.",
        "fine": False,
        "source": "label:ann",
    }
    # the newest label wins; every label counts against the budget
    add_label(any_store, fid("i0"), {"intent": "card_arrival"}, "bob")
    with any_store.engine.connect() as conn:
        assert latest_label(conn, fid("i0")).intent == "card_arrival"
        assert latest_label(conn, fid("i1")) is None
    assert count_labels(any_store) == 2
    with pytest.raises(UserInputError, match="intnet"):
        add_label(any_store, fid("i0"), {"intnet": "x"}, "bob")
    code, _, err = run(capsys, seeded, "label", fid("i0"))
    assert code == 2 and "--intent" in err


def test_label_file_keeps_good_lines_and_names_bad_ones(
    seeded: Path, any_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "labels.jsonl"
    lines = [
        json.dumps({"failure_id": fid("i0"), "intent": "card_arrival", "text": "the request, as the label queue wrote it"}),
        "{not json",
        json.dumps({"failure_id": fid("i1"), "intent": "refund_status", "answer": "It takes 5 days.", "by": "cat"}),
        "",
        json.dumps({"failure_id": "f-missing", "intent": "x"}),
        json.dumps({"failure_id": fid("i2"), "intent": ""}),
        json.dumps({"failure_id": fid("i2"), "intent": "refund_status", "colour": "red"}),
        json.dumps({"intent": "refund_status"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, seeded, "label", "--file", str(path), "--by", "dan", "--json")
    assert code == 2
    result = json.loads(out)
    assert result["added"] == 2 and result["lines"] == 7 and result["labels_total"] == 2
    assert [e.split(":")[1] for e in result["errors"]] == ["2", "5", "6", "7", "8"]
    assert "labels.jsonl:2: not valid JSON" in err
    assert "labels.jsonl:5: no failure with id 'f-missing'" in err
    assert "labels.jsonl:6: intent:" in err
    assert "labels.jsonl:7: colour:" in err
    assert "labels.jsonl:8: failure_id is missing" in err
    assert "5 line(s) of" in err and "the other 2 are stored" in err
    with any_store.engine.connect() as conn:
        assert latest_label(conn, fid("i0")).source == "label:dan"
        assert latest_label(conn, fid("i1")).source == "label:cat"
        assert latest_label(conn, fid("i2")) is None
    assert count_labels(any_store) == 2


def test_judge_command_prints_the_stage_summary(seeded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, seeded, "judge", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["total"] == 1 and summary["judge"] == "rule"  # only i4 is triaged; no endpoint configured
    code, out, _ = run(capsys, seeded, "failures", "show", fid("i4"), "--json")
    assert json.loads(out)["verdict"]["judge"] == "rule"
    code, out, _ = run(capsys, seeded, "judge")
    assert code == 0 and "total" in out and "0" in out  # nothing left to judge
    code, out, _ = run(capsys, seeded, "judge", "--id", fid("i4"), "--json")
    assert code == 0 and json.loads(out)["total"] == 1  # an explicit id is judged again
    assert run(capsys, seeded, "judge", "--id", "f-nope")[0] == 3


def test_newest_labels_and_uncorrectable_attempts_on_both_stores(any_store: Store) -> None:
    from flywheel.data.labels import latest_labels

    seed(any_store)
    add_label(any_store, fid("i0"), {"intent": "a"}, "ann")
    add_label(any_store, fid("i0"), {"intent": "b", "answer": "B"}, "bob")
    add_label(any_store, fid("i1"), {"intent": "c"}, "cat")
    with any_store.engine.connect() as conn:
        refs = latest_labels(conn, [fid("i0"), fid("i1"), fid("i2")])
    assert {k: (r.intent, r.answer, r.source) for k, r in refs.items()} == {
        fid("i0"): ("b", "B", "label:bob"),
        fid("i1"): ("c", None, "label:cat"),
    }
    with any_store.begin() as conn:
        repo.save_uncorrectable(conn, fid("i0"), "kb", "no approved response for intent 'b' in the knowledge base")
    view = repo.show(any_store, fid("i0"))
    assert view.failure.status == FailureStatus.UNCORRECTABLE
    assert (
        view.correction.answer == ""
        and not view.correction.verified
        and view.correction.verification.reasons == ["no approved response for intent 'b' in the knowledge base"]
    )
    rows = {r.id: r for r in repo.list_failures(any_store, repo.FailureFilter(status="uncorrectable"))}
    assert set(rows) == {fid("i0")} and not rows[fid("i0")].verified


def test_commands_outside_a_project_refuse_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty, absent = tmp_path / "empty", tmp_path / "nonexistent"
    empty.mkdir()
    for folder, args in ((empty, ["failures"]), (absent, ["models"]), (absent, ["kb", "add", "x.md"]), (empty, ["slack", "test"])):
        code, _, err = run(capsys, folder, *args)
        assert code == 2 and err == f"error: not a flywheel project: run flywheel init (no flywheel.toml in {folder})\n"
    assert list(empty.iterdir()) == [] and not absent.exists()  # no .flywheel/, no folder
    monkeypatch.chdir(empty)
    assert main(["failures", "counts"]) == 2 and "not a flywheel project" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
    # help works anywhere; init makes the project, after which the same command runs
    assert run(capsys, absent, "ingest", "--help")[0] == 0 and not absent.exists()
    assert run(capsys, empty, "init")[0] == 0
    code, out, _ = run(capsys, empty, "failures", "--json")
    assert code == 0 and json.loads(out) == []


def test_piped_tables_are_not_cut_to_80_columns(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Output that is not a terminal (a pipe, a file, capsys) keeps whole ids and names in tables."""
    from rich.table import Table

    from flywheel.cli import PIPED_WIDTH, out_console

    monkeypatch.delenv("COLUMNS", raising=False)
    long_intent = "card_payment_not_recognised_" + "x" * 120
    table = Table("id", "intent")
    table.add_row("f-0123456789ab", long_intent)
    console = out_console()
    assert console.width == PIPED_WIDTH
    console.print(table)
    assert long_intent in capsys.readouterr().out
    monkeypatch.setenv("COLUMNS", "132")
    assert out_console().width == 132
