"""PII scrubbing: recall and precision per kind on a labelled set, plus the behaviours ingest relies on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from flywheel.data.pii import KINDS, Scrubber, Span, find_pii, may_contain_pii, scrub

LABELLED = Path(__file__).parent / "data" / "pii_labelled.jsonl"
RECALL_FLOOR = 0.95
PRECISION_FLOOR = 0.90


def _load() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def test_recall_and_precision_per_kind_meet_the_floors() -> None:
    rows = _load()
    table = score(rows)
    print()
    print(f"{'kind':<12} {'positives':>9} {'recall':>7} {'precision':>9}")
    for kind, row in table.items():
        print(f"{kind:<12} {row['positives']:>9} {row['recall']:>7.3f} {row['precision']:>9.3f}")
    negatives = sum(1 for r in rows if not r["spans"])
    assert negatives >= 40, "the set must keep its hard negatives"
    for kind, row in table.items():
        assert row["positives"] >= 20, f"{kind}: too few labelled positives"
        assert row["recall"] >= RECALL_FLOOR, f"{kind}: recall {row['recall']:.3f}"
        assert row["precision"] >= PRECISION_FLOOR, f"{kind}: precision {row['precision']:.3f}"


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
