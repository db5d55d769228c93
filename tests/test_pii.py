"""PII scrubbing: recall and precision per kind on labelled sets, plus the behaviours ingest relies on, and each
kind through the real ingest path into SQLite."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from flywheel.data.ingest import ingest_files
from flywheel.data.pii import KINDS, Scrubber, Span, find_pii, may_contain_pii, scrub
from flywheel.data.pii_dob import _CUE, may_hold_birth
from flywheel.data.rows import build_row
from flywheel.records import utcnow
from flywheel.store import interactions as repo
from flywheel.store.db import Store

DATA = Path(__file__).parent / "data"
LABELLED = DATA / "pii_labelled.jsonl"  # the set the detectors were written and tuned against
HELDOUT = DATA / "pii_heldout.jsonl"  # split off at random from the rows written for PERSON/ADDRESS/DOB; not tuned on
# (recall, precision) floors per kind, a little under what docs/ingest.md reports, so that a regression fails.
FLOORS = {
    LABELLED: {
        **dict.fromkeys(("EMAIL", "PHONE", "CARD", "IBAN", "NATIONAL_ID", "SECRET"), (0.95, 0.95)),
        "PERSON": (0.95, 0.95),
        "ADDRESS": (0.95, 0.95),
        "DOB": (0.95, 0.95),
    },
    HELDOUT: {"PERSON": (0.95, 0.93), "ADDRESS": (0.95, 0.95), "DOB": (0.95, 0.95)},
}
NEW_KINDS = ("PERSON", "ADDRESS", "DOB")


def _load(path: Path = LABELLED) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _matches(found: Span, gold: dict) -> bool:
    """Same kind and nearly the same characters (intersection over union >= 0.8): a detector that takes a
    trailing ')' along still counts, one that catches half a number does not."""
    if found.kind != gold["kind"]:
        return False
    inter = min(found.end, gold["end"]) - max(found.start, gold["start"])
    union = max(found.end, gold["end"]) - min(found.start, gold["start"])
    return inter > 0 and inter / union >= 0.8


def score(rows: list[dict]) -> dict[str, dict[str, float]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for row in rows:
        found = find_pii(row["text"])
        gold = row["spans"]
        used: set[int] = set()
        for span in found:
            hit = next((i for i, g in enumerate(gold) if i not in used and _matches(span, g)), None)
            if hit is None:
                fp[span.kind] += 1
            else:
                used.add(hit)
                tp[span.kind] += 1
        for i, g in enumerate(gold):
            if i not in used:
                fn[g["kind"]] += 1
    table = {}
    for kind in KINDS:
        table[kind] = {
            "positives": tp[kind] + fn[kind],
            "recall": tp[kind] / (tp[kind] + fn[kind]) if tp[kind] + fn[kind] else 1.0,
            "precision": tp[kind] / (tp[kind] + fp[kind]) if tp[kind] + fp[kind] else 1.0,
        }
    return table


@pytest.mark.parametrize("path", [LABELLED, HELDOUT], ids=["labelled", "heldout"])
def test_recall_and_precision_per_kind_meet_the_floors(path: Path) -> None:
    rows = _load(path)
    table = score(rows)
    print()
    print(f"{path.name}: {'kind':<12} {'positives':>9} {'recall':>7} {'precision':>9}")
    for kind, row in table.items():
        print(f"{'':<{len(path.name) + 2}}{kind:<12} {row['positives']:>9} {row['recall']:>7.3f} {row['precision']:>9.3f}")
    negatives = sum(1 for r in rows if not r["spans"])
    assert negatives >= 40, "the set must keep its hard negatives"
    for kind, (recall, precision) in FLOORS[path].items():
        row = table[kind]
        assert row["positives"] >= 20, f"{kind}: too few labelled positives"
        assert row["recall"] >= recall, f"{kind}: recall {row['recall']:.3f}"
        assert row["precision"] >= precision, f"{kind}: precision {row['precision']:.3f}"
    for kind in set(KINDS) - set(FLOORS[path]):  # the other kinds: nothing may be found where none is labelled
        assert table[kind]["precision"] == 1.0, f"{kind}: found where {path.name} labels none"


def test_hard_negatives_stay_untouched() -> None:
    for text in [
        "Order #100234567 shipped on 2024-03-15, total $1,234.56.",
        "card 4111 1111 1111 1112 fails Luhn",
        "Upgrade to v2.13.0; server 192.168.10.254",
        "IBAN DE89 3704 0044 0532 0130 01 (wrong check digits)",
    ]:
        assert scrub(text) == text


def test_placeholders_replace_each_kind() -> None:
    text = (
        "mail jane@example.com, call +44 20 7946 0958, card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, SSN 536-90-4399, key sk-proj-abcdefghijklmnopqrstuvwxyz0123"
    )
    assert scrub(text) == "mail [EMAIL], call [PHONE], card [CARD], IBAN [IBAN], SSN [NATIONAL_ID], key [SECRET]"


def test_scrubbing_is_idempotent_and_counts_kinds() -> None:
    scrubber = Scrubber()
    once = scrubber.text("Bearer abcdefghijklmnop1234 and api_key=Zx9fK2mQ8vL1pR7t, mail a@b.io")
    assert once == "Bearer [SECRET] and api_key=[SECRET], mail [EMAIL]"
    assert scrub(once) == once
    assert scrubber.counts == {"SECRET": 2, "EMAIL": 1}


def test_json_arguments_stay_valid_json_and_keys_give_context() -> None:
    scrubber = Scrubber()
    args = '{"email": "a@b.co", "note": "line\\ncall 555-123-4567", "api_key": "Zx9fK2mQ8vL1pR7t", "n": 3}'
    out = json.loads(scrubber.json_text(args))
    assert out == {"email": "[EMAIL]", "note": "line\ncall [PHONE]", "api_key": "[SECRET]", "n": 3}
    clean = '{"order_id":  "A-48213"}'
    assert scrubber.json_text(clean) == clean  # untouched text keeps its exact bytes
    assert scrubber.json_text("not json a@b.co") == "not json [EMAIL]"


@pytest.mark.parametrize("text", ["", "hello there, how can I help?", "Your refund is on its way."])
def test_clean_text_is_rejected_by_the_gate(text: str) -> None:
    assert not may_contain_pii(text)
    assert find_pii(text) == []


# --- names, postal addresses and dates of birth ----------------------------------------------------------------


def test_placeholders_replace_names_addresses_and_dates_of_birth() -> None:
    text = "Hi, I'm Amara Okafor, born 3 July 1990; ship order 4412 (placed 2026-02-01) to 221B Baker Street, London NW1 6XE."
    assert scrub(text) == "Hi, I'm [PERSON], born [DOB]; ship order 4412 (placed 2026-02-01) to [ADDRESS]."


@pytest.mark.parametrize(
    "text",
    [
        "Will you ship to Paris on May 5?",
        "May I ask when the Grace period ends? Bill me on 2026-03-01, please.",
        "Mark the ticket as resolved; the order date was 12/04/2024.",
        "Chase Bank declined the card, so I paid with Apple Pay.",
        "Is the Victoria Station store open on Sunday, or only the one on Oxford Street?",
        "Happy birthday from ACME! Use code BDAY20 before 2025-12-31.",
        "I ordered 3 Garden Way planters and the Baker Street mug.",
        "In the app, choose Cards, then Link a card and follow the steps.",
        "Hello, Sync fails with error 0x80070005 on Windows.",
    ],
)
def test_hard_negatives_for_the_new_kinds_stay_untouched(text: str) -> None:
    assert scrub(text) == text


def test_scrubbing_is_idempotent_on_every_labelled_text() -> None:
    """Placeholders never match again, so text scrubbed once is a fixed point: re-ingesting it changes
    nothing, and its content hash stays the same."""
    assert find_pii("[PERSON] [ADDRESS] [DOB] [EMAIL] [PHONE] [CARD] [IBAN] [NATIONAL_ID] [SECRET]") == []
    for row in _load(LABELLED) + _load(HELDOUT):
        once = scrub(row["text"])
        assert scrub(once) == once, row["text"]


def test_json_keys_say_what_a_bare_value_is() -> None:
    scrubber = Scrubber()
    args = '{"first_name": "Nkechi", "lastName": "Okafor", "dob": "1990-07-03", "street": "12 Oak Lane", "city": "Leeds", "name": "Blue Widget", "order_date": "2026-02-01"}'
    out = json.loads(scrubber.json_text(args))
    assert out == {
        "first_name": "[PERSON]",
        "lastName": "[PERSON]",
        "dob": "[DOB]",
        "street": "[ADDRESS]",
        "city": "Leeds",
        "name": "Blue Widget",
        "order_date": "2026-02-01",
    }
    assert scrubber.counts == {"PERSON": 2, "DOB": 1, "ADDRESS": 1}
    assert scrubber.json_text('{"dob": "unknown", "street": "n/a"}') == '{"dob": "unknown", "street": "n/a"}'


@pytest.mark.parametrize(
    "cue",
    [
        "date of birth",
        "Birth date",
        "birthdate",
        "BIRTHDAY",
        "b-day",
        "DOB",
        "D.O.B.",
        "dob",
        "born",
        "Born",
        "née le",
        "date de naissance",
        "Geburtsdatum",
        "geboren",
        "fecha de nacimiento",
        "nacido el",
        "data di nascita",
        "nato il",
        "Anniversaire",
    ],
)
def test_the_cheap_birth_gate_passes_every_cue_the_scan_knows(cue: str) -> None:
    text = f"{cue}: 12/04/1985"
    assert _CUE.search(text) and may_hold_birth(text)
    assert [s.kind for s in find_pii(text)] == ["DOB"]


def _quarantined(store: Store) -> list[dict]:
    path = store.settings.quarantine_path
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


RAW_PII = [
    "Johanna",
    "Mbeki",
    "Kwame",
    "Mensah",
    "Okafor",
    "Priya Raman",
    "Evergreen",
    "Hauptstraße",
    "Baker Street",
    "rue de la Paix",
    "12 April 1985",
    "1990-07-03",
    "03/07/1990",
    "3 July 1990",
]


def test_each_new_kind_is_scrubbed_from_every_field_on_the_way_into_sqlite(store: Store, tmp_path: Path) -> None:
    line = {
        "id": "conv-pii",
        "timestamp": "2026-02-03T10:00:00Z",
        "user_id": "Johanna Mbeki-Larsson",  # a name as user id: pseudonymised like an e-mail
        "messages": [
            {
                "role": "user",
                "content": "Hi, my name is Johanna Mbeki-Larsson, born 12 April 1985. Please ship order 4412 "
                "to 742 Evergreen Terrace, Springfield, OR 97403 by 2026-03-01.",
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "update_customer",
                            "arguments": json.dumps(
                                {
                                    "customer_name": "Kwame Mensah",
                                    "dob": "1990-07-03",
                                    "street": "Hauptstraße 5, 10115 Berlin",
                                    "order_date": "2026-02-01",
                                }
                            ),
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "name": "update_customer",
                "content": '{"ok": true, "note": "holder Dr. Amara Okafor, DOB 03/07/1990, 221B Baker Street, London NW1 6XE"}',
            },
            {"role": "assistant", "content": "Thanks Johanna! Order 4412 ($45.10) ships on 2026-03-01 from our Paris warehouse."},
        ],
        "complaint": "Agent Priya Raman ignored me. I live at 12 rue de la Paix, 75002 Paris and was born on 3 July 1990.",
    }
    path = tmp_path / "logs.jsonl"
    path.write_text(
        json.dumps(line, ensure_ascii=False) + "\n" + json.dumps({"messages": [{"role": "robot", "content": line["complaint"]}]}) + "\n",
        encoding="utf-8",
    )
    summary = ingest_files(store, store.settings, [path])
    assert (summary.files[0].stored, summary.files[0].quarantined) == (1, 1)
    got = repo.get(store, "conv-pii")
    assert got.messages[0].content == "Hi, my name is [PERSON], born [DOB]. Please ship order 4412 to [ADDRESS] by 2026-03-01."
    assert json.loads(got.messages[1].tool_calls[0].function.arguments) == {
        "customer_name": "[PERSON]",
        "dob": "[DOB]",
        "street": "[ADDRESS]",
        "order_date": "2026-02-01",
    }
    assert json.loads(got.messages[2].content) == {"ok": True, "note": "holder Dr. [PERSON], DOB [DOB], [ADDRESS]"}
    assert got.messages[3].content == "Thanks [PERSON]! Order 4412 ($45.10) ships on 2026-03-01 from our Paris warehouse."
    assert got.signals.complaint == "Agent [PERSON] ignored me. I live at [ADDRESS] and was born on [DOB]."
    assert got.user_id.startswith("user-")
    stored = json.dumps([m.model_dump() for m in got.messages], ensure_ascii=False) + got.signals.complaint + got.user_id
    quarantined = _quarantined(store)[0]["raw"]
    for raw in RAW_PII:
        assert raw not in stored and raw not in quarantined, raw
    assert "[PERSON]" in quarantined and "[ADDRESS]" in quarantined and "[DOB]" in quarantined
    # five fields of the stored line, and the quarantined line's copy of the complaint
    assert summary.files[0].pii == {"PERSON": 6, "ADDRESS": 5, "DOB": 5}


def test_text_without_the_new_kinds_is_stored_as_it_came(store: Store, tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Will you ship the Galaxy Tab S9 to our Berlin office? The order date was 2024-03-15."},
        {"role": "assistant", "content": "Yes: order ORD-553201 ships Monday from Paris, delivery by March 5, 2026."},
    ]
    path = tmp_path / "logs.jsonl"
    path.write_text(json.dumps({"id": "clean", "messages": messages}) + "\n", encoding="utf-8")
    summary = ingest_files(store, store.settings, [path])
    assert summary.files[0].pii == {}
    assert [m.content for m in repo.get(store, "clean").messages] == [m["content"] for m in messages]


def test_already_scrubbed_text_keeps_its_content_hash(store: Store, tmp_path: Path) -> None:
    raw = {
        "timestamp": "2026-02-03T10:00:00Z",
        "user_id": "u-7",
        "messages": [{"role": "user", "content": "This is Kwame Mensah, DOB 1990-07-03, at 45 Station Road, Leeds LS1 4AP."}],
    }
    first = tmp_path / "raw.jsonl"
    first.write_text(json.dumps({**raw, "id": "a"}) + "\n", encoding="utf-8")
    ingest_files(store, store.settings, [first])
    stored = repo.get(store, "a")
    assert stored.messages[0].content == "This is [PERSON], DOB [DOB], at [ADDRESS]."
    # the stored, scrubbed conversation logged again (an export fed back in) is the same conversation
    again = tmp_path / "scrubbed.jsonl"
    again.write_text(
        json.dumps({**raw, "id": "b", "messages": [m.model_dump(exclude_none=True) for m in stored.messages]}) + "\n", encoding="utf-8"
    )
    summary = ingest_files(store, store.settings, [again])
    assert (summary.files[0].stored, summary.files[0].duplicates, summary.files[0].pii) == (0, 1, {})


def test_live_capture_builds_rows_through_the_same_scrubber() -> None:
    """flywheel.serve.capture stores served turns with build_row and a Scrubber, as ingest does."""
    flat = {
        "messages": [{"role": "user", "content": "Dear Mrs. Okonkwo, your parcel for 9 Victoria Crescent, Edinburgh EH1 2JL is late."}],
        "complaint": "born 14.02.1978",
    }
    row = build_row(flat, Scrubber(), 10_000, "gateway", utcnow())
    assert row["messages"][0]["content"] == "Dear Mrs. [PERSON], your parcel for [ADDRESS] is late."
    assert row["complaint"] == "born [DOB]"
