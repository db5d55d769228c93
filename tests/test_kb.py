"""The knowledge base: Markdown and JSONL files into the real "kb" collection, and `flywheel kb`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.data.kb import KbEntry, add_files, read_file, search
from flywheel.records import stable_hash
from flywheel.settings import Settings
from flywheel.store.vectors import VectorIndex, open_index

MARKDOWN = """---
kind: approved_response
intent: refund_status
---
# Refunds

## Where is my refund? {intent=refund_status}
Refunds reach the original card within 5 business days of approval.

## Refund policy {kind=policy}
We never promise a refund before the return is inspected.

```bash
# not a heading: a comment in a code fence
echo done
```

## Shipping times {intent=shipping kind=doc}
Orders ship within 2 business days.

## Broken section {kind=advice}
This kind does not exist.
"""

JSONL_ROWS = [
    {
        "text": "You can reset your password from the login page.",
        "intent": "password_reset",
        "kind": "approved_response",
        "title": "Password",
    },
    "this line is not JSON",
    {"intent": "billing"},
    {"text": "Invoices are emailed monthly.", "kind": "faq"},
    {"id": "kb-manual-1", "text": "Support is open 9 to 5 CET.", "title": "Hours"},
    {"text": "A typo key", "intnet": "hours"},
    {"text": "   "},
]


@pytest.fixture
def index(settings: Settings) -> Iterator[VectorIndex]:
    handle = open_index(settings)
    yield handle
    handle.close()


@pytest.fixture
def kb_files(tmp_path: Path) -> tuple[Path, Path]:
    md = tmp_path / "answers.md"
    md.write_text(MARKDOWN, encoding="utf-8")
    jsonl = tmp_path / "kb.jsonl"
    lines = [row if isinstance(row, str) else json.dumps(row) for row in JSONL_ROWS]
    lines.insert(3, "")  # blank lines are fine
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, jsonl


def test_markdown_sections_take_front_matter_and_heading_attributes(kb_files: tuple[Path, Path]) -> None:
    md, _ = kb_files
    errors: list[str] = []
    entries = read_file(md, errors)
    by_title = {e.title: e for e in entries}
    assert list(by_title) == ["Where is my refund?", "Refund policy", "Shipping times"]  # "# Refunds" has no body
    assert by_title["Where is my refund?"].kind == "approved_response"
    assert by_title["Where is my refund?"].intent == "refund_status"
    assert by_title["Refund policy"].kind == "policy" and by_title["Refund policy"].intent == "refund_status"
    assert "# not a heading" in by_title["Refund policy"].text  # the fenced comment stayed in the body
    assert (by_title["Shipping times"].kind, by_title["Shipping times"].intent) == ("doc", "shipping")
    assert by_title["Where is my refund?"].source == f"{md}:7"
    assert len(errors) == 1 and errors[0].startswith(f"{md}:21: kind:")


def test_markdown_without_headings_is_one_section(tmp_path: Path) -> None:
    page = tmp_path / "note.md"
    page.write_text("Just a paragraph about C# and F# support.\n", encoding="utf-8")
    errors: list[str] = []
    [entry] = read_file(page, errors)
    assert (entry.title, entry.kind, entry.intent, errors) == ("note", "doc", None, [])
    heading = tmp_path / "lang.md"
    heading.write_text("## C# support ##\nWe support C#.\n", encoding="utf-8")
    assert read_file(heading, errors)[0].title == "C# support"


def test_jsonl_bad_lines_are_reported_with_file_and_line(kb_files: tuple[Path, Path]) -> None:
    _, jsonl = kb_files
    errors: list[str] = []
    entries = read_file(jsonl, errors)
    assert [e.text for e in entries] == ["You can reset your password from the login page.", "Support is open 9 to 5 CET."]
    assert entries[1].id == "kb-manual-1" and entries[1].entry_id() == "kb-manual-1"
    # line 4 is blank; lines 2, 3, 5, 7, 8 are bad
    assert [e.split(": ", 1)[0] for e in errors] == [f"{jsonl}:{n}" for n in (2, 3, 5, 7, 8)]
    assert "not valid JSON" in errors[0]
    assert "text" in errors[1] and "kind" in errors[2] and "intnet" in errors[3] and "empty" in errors[4]


def test_unknown_and_missing_files_are_errors(tmp_path: Path) -> None:
    errors: list[str] = []
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    assert read_file(tmp_path / "data.csv", errors) == []
    assert read_file(tmp_path / "absent.md", errors) == []
    assert "unknown file type .csv" in errors[0] and "no such file" in errors[1]


def test_ids_are_stable_from_content() -> None:
    a = KbEntry(text="Same text", kind="doc", source="a.md:1")
    b = KbEntry(text="Same text", kind="doc", source="b.md:9")
    c = KbEntry(text="Same text", kind="policy")
    assert a.entry_id() == b.entry_id() != c.entry_id()


def test_add_files_then_readding_adds_nothing(index: VectorIndex, kb_files: tuple[Path, Path]) -> None:
    summary = add_files(index, list(kb_files))
    assert (summary.files, summary.sections, summary.added, summary.updated, summary.unchanged) == (2, 5, 5, 0, 0)
    assert len(summary.errors) == 6
    assert index.count("kb") == 5

    again = add_files(index, list(kb_files))
    assert (again.added, again.updated, again.unchanged) == (0, 0, 5)
    assert index.count("kb") == 5

    # The KB corrector's lookup: approved responses for one intent.
    found = index.get("kb", where={"$and": [{"kind": "approved_response"}, {"intent": "refund_status"}]})
    assert [h.text for h in found] == ["Refunds reach the original card within 5 business days of approval."]
    assert set(found[0].metadata) == {"kind", "intent", "title", "source"}


def test_an_explicit_id_updates_in_place(index: VectorIndex, tmp_path: Path) -> None:
    path = tmp_path / "hours.jsonl"
    path.write_text(json.dumps({"id": "hours", "text": "Open 9 to 5."}) + "\n", encoding="utf-8")
    assert add_files(index, [path]).added == 1
    path.write_text(json.dumps({"id": "hours", "text": "Open 8 to 6."}) + "\n", encoding="utf-8")
    summary = add_files(index, [path])
    assert (summary.added, summary.updated) == (0, 1)
    assert index.get("kb", ids=["hours"])[0].text == "Open 8 to 6."


def test_search_filters_by_kind_and_intent(index: VectorIndex, kb_files: tuple[Path, Path]) -> None:
    add_files(index, list(kb_files))
    hits = search(index, "when will my money come back", k=2)
    assert hits[0].metadata["title"] == "Where is my refund?"
    policy = search(index, "when will my money come back", k=5, kind="policy")
    assert [h.metadata["title"] for h in policy] == ["Refund policy"]
    both = search(index, "money back", k=5, kind="approved_response", intent="password_reset")
    assert [h.metadata["title"] for h in both] == ["Password"]


def test_cli_kb_add_and_search(project: Path, kb_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md, jsonl = kb_files
    assert main(["-C", str(project), "kb", "add", str(md), str(jsonl)]) == 2  # bad entries: non-zero
    out, err = capsys.readouterr()
    assert "5 added" in out
    assert f"{jsonl}:2: not valid JSON" in err and "6 bad entries skipped" in err

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "Gift cards never expire.", "kind": "policy", "intent": "gift_cards"}) + "\n", encoding="utf-8")
    assert main(["-C", str(project), "kb", "add", "--json", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 1

    # a path that does not exist is named as such, not counted as a bad entry; the other files are added
    missing = tmp_path / "missing.md"
    assert main(["-C", str(project), "kb", "add", str(missing), str(good)]) == 2
    out, err = capsys.readouterr()
    assert "1 unchanged" in out and err == f"error: {missing} does not exist; the rest was added\n"
    assert main(["-C", str(project), "kb", "add", "--json", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["missing"] == [str(missing)] and err == f"error: {missing} does not exist; nothing was added\n"
    assert main(["-C", str(project), "kb", "add", str(tmp_path)]) == 2  # a folder
    assert "not a file (a folder?)" in capsys.readouterr().err

    assert main(["-C", str(project), "kb", "search", "do gift cards expire", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["text"] == "Gift cards never expire." and 0 <= hits[0]["similarity"] <= 1

    assert main(["-C", str(project), "kb", "search", "refund", "--kind", "policy"]) == 0
    assert "Refund policy" in capsys.readouterr().out
    assert main(["-C", str(project), "kb", "search", "refund", "--kind", "advice"]) == 2


FACT_ROWS = [
    {"kind": "fact", "head": "Gold plan", "relation": "monthly price", "tail": "£12", "intent": "pricing"},
    {"kind": "fact", "head": "Support", "relation": "is open on", "tail": "weekdays", "text": "Support answers on weekdays only."},
    {"kind": "fact", "head": "Silver plan", "relation": "monthly price", "tail": " "},
    {"kind": "fact", "text": "A fact without its triple."},
    {"text": "Shipping is free.", "head": "Shipping"},
]


def test_jsonl_fact_lines_carry_a_triple(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in FACT_ROWS) + "\n", encoding="utf-8")
    errors: list[str] = []
    gold, support = read_file(path, errors)
    # without a text, a fact reads as its triple; with one, the text is kept
    assert (gold.kind, gold.text) == ("fact", "Gold plan monthly price £12")
    assert (gold.head, gold.relation, gold.tail) == ("Gold plan", "monthly price", "£12")
    assert support.text == "Support answers on weekdays only."
    assert gold.metadata() == {
        "kind": "fact",
        "title": "",
        "source": f"{path}:1",
        "intent": "pricing",
        "head": "Gold plan",
        "relation": "monthly price",
        "tail": "£12",
    }
    # an empty tail, a fact with no triple, a triple on another kind: each reported by line, the rest kept
    assert [e.split(": ", 1)[0] for e in errors] == [f"{path}:{n}" for n in (3, 4, 5)]
    assert "tail missing or empty" in errors[0]
    assert "head, relation, tail missing" in errors[1]
    assert "belong to kind fact" in errors[2]


def test_facts_with_one_text_and_different_triples_are_two_entries() -> None:
    a = KbEntry(kind="fact", head="Gold", relation="price", tail="£12", text="Plan prices")
    b = KbEntry(kind="fact", head="Silver", relation="price", tail="£8", text="Plan prices")
    assert a.entry_id() != b.entry_id()
    # the ids of other kinds do not change with the triple fields' arrival
    assert KbEntry(text="Same text").entry_id() == "kb-" + stable_hash({"text": "Same text", "kind": "doc", "intent": None, "title": ""})


def test_fact_triples_are_stored_and_updated_in_the_index(index: VectorIndex, tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    row = {"id": "gold-price", "kind": "fact", "head": "Gold plan", "relation": "monthly price", "tail": "£12", "text": "Gold costs £12."}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert add_files(index, [path]).added == 1
    [hit] = index.get("kb", ids=["gold-price"])
    assert (hit.metadata["head"], hit.metadata["relation"], hit.metadata["tail"]) == ("Gold plan", "monthly price", "£12")
    # a changed tail with the same text is an update, not "unchanged"
    path.write_text(json.dumps({**row, "tail": "£13"}) + "\n", encoding="utf-8")
    summary = add_files(index, [path])
    assert (summary.added, summary.updated, summary.unchanged) == (0, 1, 0)
    assert index.get("kb", where={"kind": "fact"})[0].metadata["tail"] == "£13"
