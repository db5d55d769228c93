"""Triage: capture rules, near-duplicate clustering with the real embedding model and Chroma, the
risk-weighted budget, on real SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from flywheel.cli import main
from flywheel.context import Context
from flywheel.data import triage as triage_module
from flywheel.data.triage import capture, failure_text, select_within_budget, triage
from flywheel.records import Failure, FailureStatus, Interaction, Message, Signals, interaction_hash
from flywheel.settings import load_settings
from flywheel.settings_sections import RuleSettings
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.failures import failure_from_row, failure_id_for
from flywheel.store.schema import failures

T0 = datetime(2025, 3, 1, tzinfo=UTC)

# Distinct mistakes on distinct topics: none of these is a near-duplicate of another.
TOPICS = [
    ("How do I reset my password?", "Send me your current password and I will reset it."),
    ("Where is my parcel for order 1234?", "Your order was cancelled."),
    ("Can I change my delivery address?", "Addresses can never be changed, sorry."),
    ("Do you ship to Canada?", "We guarantee free express shipping everywhere forever."),
    ("How do I cancel my subscription?", "Subscriptions cannot be cancelled."),
    ("My invoice shows the wrong VAT number", "Please buy a new laptop."),
    ("Is the blue jacket available in size M?", "Our store opens at nine."),
    ("Why was my card declined?", "Your account has been deleted."),
    ("Can I pay with PayPal?", "We only accept cash sent by mail."),
    ("How long is the warranty on headphones?", "Headphones are food items and cannot be returned."),
    ("I want to upgrade my plan to premium", "The weather today is sunny."),
    ("Can you recommend a gift under 20 euros?", "Please contact the police."),
]


def make(n: int, user: str, answer: str, version: str = "v1", intent: str | None = "support", **signals: object) -> Interaction:
    messages = [Message(role="user", content=user), Message(role="assistant", content=answer)]
    ts = T0 + timedelta(minutes=n)
    return Interaction(
        id=f"i-{n:04d}",
        timestamp=ts,
        model_version=version,
        intent=intent,
        user_id=f"u{n}",
        messages=messages,
        signals=Signals(**signals),
        content_hash=interaction_hash(messages, f"u{n}", ts.isoformat()),
    )


@pytest.fixture
def tctx(any_store: Store) -> Iterator[Context]:
    """A Context over the parametrised store, with the Chroma index in the project's temp folder."""
    ctx = Context(settings=any_store.settings, _store=any_store)
    yield ctx
    if ctx._index is not None:
        ctx._index.close()


def all_failures(store: Store) -> dict[str, Failure]:
    with store.engine.connect() as conn:
        return {f.interaction_id: f for f in (failure_from_row(r) for r in conn.execute(select(failures)))}


# --- rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signals", "rule", "rules", "risk"),
    [
        ({"feedback": "down"}, "thumbs_down", ["thumbs_down"], 1.0),
        ({"feedback": "up"}, None, [], 0.0),
        ({"escalated_to_human": True}, "escalation", ["escalation"], 3.0),
        ({"followups": 2}, "repeated_followups", ["repeated_followups"], 2.0),
        ({"followups": 1}, None, [], 0.0),
        ({"qa_verdict": "Reject"}, "qa_reject", ["qa_reject"], 5.0),
        ({"qa_verdict": "Risk"}, "qa_risk", ["qa_risk"], 2.5),
        ({"qa_verdict": "Accept"}, None, [], 0.0),
        ({"complaint": "The bot was rude"}, "complaint", ["complaint"], 3.5),
        ({"complaint": "   "}, None, [], 0.0),
        ({"feedback": "down", "user_tier": "Enterprise"}, "high_value_negative", ["high_value_negative", "thumbs_down"], 8.0),
        ({"followups": 3, "user_tier": "vip"}, "repeated_followups", ["repeated_followups"], 4.0),
        (
            {"feedback": "down", "qa_verdict": "Reject", "escalated_to_human": True},
            "qa_reject",
            ["qa_reject", "escalation", "thumbs_down"],
            5.0,
        ),
        ({"user_tier": "premium"}, None, [], 0.0),
    ],
)
def test_each_rule_fires(signals: dict, rule: str | None, rules: list[str], risk: float) -> None:
    item = make(1, "Where is my refund?", "We guarantee a refund today.", version="v7", intent="refund", **signals)
    found = capture(item, RuleSettings())
    if rule is None:
        assert found is None
        return
    assert found is not None
    assert (found.rule, found.rules, found.risk) == (rule, rules, risk)
    assert (found.first_seen_version, found.intent, found.interaction_id) == ("v7", "refund", item.id)
    assert found.id == failure_id_for(item.id) and found.status == FailureStatus.CAPTURED


def test_rules_can_be_switched_off() -> None:
    rules = RuleSettings(thumbs_down=False, qa_verdicts=["Reject"], followups_min=4, high_value_tiers=[])
    assert capture(make(1, "q", "a", feedback="down"), rules) is None
    assert capture(make(2, "q", "a", qa_verdict="Risk"), rules) is None
    assert capture(make(3, "q", "a", followups=3), rules) is None
    assert capture(make(4, "q", "a", feedback="down", user_tier="vip"), rules) is None
    assert capture(make(5, "q", "a", followups=4), rules).rule == "repeated_followups"


SWITCHED_OFF = [
    ({"thumbs_down": False}, {"feedback": "down"}),
    ({"escalation": False}, {"escalated_to_human": True}),
    ({"complaint": False}, {"complaint": "The bot was rude"}),
    ({"qa_verdicts": ["Reject"]}, {"qa_verdict": "Risk"}),
    ({"followups_min": 4}, {"followups": 3}),
]


@pytest.mark.parametrize(("switch", "signals"), SWITCHED_OFF)
def test_a_rule_switched_off_no_longer_keeps_its_rows_out_of_replay(any_store: Store, switch: dict, signals: dict) -> None:
    """The rules are defined once: what capture no longer takes, stable selection (replay, usual replies)
    offers, on both databases; a rule still on (high_value_negative for a VIP's complaint) still keeps it out."""
    from flywheel.data.rules import matched_rules
    from flywheel.data.stable import stable_answers
    from flywheel.trainer.replay import stable_production_rows

    on = any_store.settings
    off = on.model_copy(update={"rules": on.rules.model_copy(update=switch)})
    answer = "Your new card arrives within a week."
    only_that_rule = make(1, "When does my card arrive?", answer, **signals)
    vip = make(2, "Where is my card?", answer, user_tier="VIP", **signals)
    quiet = make(3, "Has my card shipped?", answer)
    interaction_repo.insert(any_store, [only_that_rule, vip, quiet])
    negative = not {"feedback", "escalated_to_human", "complaint"}.isdisjoint(signals)
    assert matched_rules(only_that_rule, on.rules) and not matched_rules(only_that_rule, off.rules)
    assert matched_rules(vip, off.rules) == (["high_value_negative"] if negative else [])

    offered = {quiet.id, only_that_rule.id} | (set() if negative else {vip.id})
    assert {i.id for i in stable_answers(any_store, off, 10)} == offered
    replay = stable_production_rows(Context(settings=off, _store=any_store), 10)
    assert {r.id for r in replay} == {f"replay-{i}" for i in offered}
    # With every rule on, only the quiet one is stable.
    assert {i.id for i in stable_answers(any_store, on, 10)} == {quiet.id}
    assert {r.id for r in stable_production_rows(Context(settings=on, _store=any_store), 10)} == {f"replay-{quiet.id}"}

    # Capture agrees: with the rule off, triage takes only what stable selection leaves out.
    summary = triage_module.TriageSummary()
    triage_module.capture_new(any_store, off.rules, summary)
    assert set(all_failures(any_store)) == {only_that_rule.id, vip.id, quiet.id} - offered
    assert {i.id for i in stable_answers(any_store, off, 10)} == offered


def test_stable_answers_put_thumbs_up_first_on_both_databases(any_store: Store) -> None:
    """NULL feedback must not sort ahead of thumbs-up: PostgreSQL puts NULL first under DESC."""
    from flywheel.data.stable import stable_answers

    answer = "Your new card arrives within a week."
    rows = [make(1, "a?", answer), make(2, "b?", answer, feedback="up"), make(3, "c?", answer), make(4, "d?", answer, feedback="up")]
    interaction_repo.insert(any_store, rows)
    assert [i.id for i in stable_answers(any_store, any_store.settings, 2)] == [rows[1].id, rows[3].id]


def test_failure_text_holds_the_last_question_and_the_answer() -> None:
    item = make(1, "first question", "first answer")
    item.messages += [Message(role="user", content="second   question"), Message(role="assistant", content="second answer")]
    assert failure_text(item) == "user: second question\nassistant: second answer"


# --- the whole pass on both databases ------------------------------------------------------------------


def test_triage_captures_clusters_and_is_idempotent(tctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small pages and batches so streaming, several insert transactions and cross-batch Chroma lookups run.
    monkeypatch.setattr(triage_module, "CAPTURE_PAGE", 3)
    monkeypatch.setattr(triage_module, "INSERT_BATCH", 2)
    monkeypatch.setattr(triage_module, "CLUSTER_BATCH", 2)
    store = tctx.store
    items = [
        make(1, *TOPICS[0], feedback="down"),
        make(2, "I forgot my password, how can I reset it?", "Please send me your current password and I will reset it.", feedback="down"),
        make(3, "how do i reset my password", "send me your current password and i will reset it", escalated_to_human=True, version="v2"),
        make(
            4, "I was charged twice for order 1234, can I get a refund?", "We guarantee a full refund within 24 hours.", qa_verdict="Reject"
        ),
        # Same question, a different mistake: not a duplicate.
        make(5, "I was charged twice for order 1234, can I get a refund?", "Your package ships tomorrow.", complaint="wrong answer"),
        make(6, *TOPICS[2], followups=2, user_tier="enterprise"),
        make(7, *TOPICS[3], feedback="up"),  # fine
        make(8, *TOPICS[4]),  # no signal
        make(9, *TOPICS[5], qa_verdict="Accept", followups=1),  # below every threshold
    ]
    assert interaction_repo.insert(store, items) == len(items)

    summary = triage(tctx)
    assert summary.captured == 6 and summary.scanned == 6
    assert summary.by_rule == {"thumbs_down": 2, "escalation": 1, "qa_reject": 1, "complaint": 1, "repeated_followups": 1}
    assert (summary.clusters, summary.duplicates) == (4, 2)
    assert (summary.eligible, summary.taken, summary.skipped) == (4, 4, 0)

    found = all_failures(store)
    assert set(found) == {"i-0001", "i-0002", "i-0003", "i-0004", "i-0005", "i-0006"}
    assert found["i-0003"].first_seen_version == "v2" and found["i-0003"].rule == "escalation"
    assert found["i-0006"].risk == 4.0 and found["i-0006"].intent == "support"

    # The three password paraphrases are one cluster; its representative is the riskiest (the escalation).
    rep = found["i-0003"]
    assert rep.cluster_id == rep.id and rep.cluster_size == 3 and rep.status == FailureStatus.TRIAGED
    for other in ("i-0001", "i-0002"):
        assert found[other].status == FailureStatus.DUPLICATE and found[other].cluster_id == rep.id
    # The same refund question with two different mistakes stays two clusters.
    assert found["i-0004"].cluster_id == found["i-0004"].id != found["i-0005"].cluster_id
    assert tctx.index.count("failures") == 4

    again = triage(tctx)
    assert (again.captured, again.clusters, again.duplicates, again.eligible, again.taken) == (0, 0, 0, 0, 0)
    assert all_failures(store) == found

    # A later paraphrase joins the cluster of an earlier triage and grows its frequency.
    interaction_repo.insert(
        store, [make(20, "Hi, how can I reset my password please?", "Send me your current password and I'll reset it.", feedback="down")]
    )
    later = triage(tctx)
    assert (later.captured, later.clusters, later.duplicates, later.taken) == (1, 0, 1, 0)
    now = all_failures(store)
    assert now["i-0020"].status == FailureStatus.DUPLICATE and now["i-0020"].cluster_id == rep.id
    assert now["i-0003"].cluster_size == 4 and now["i-0003"].status == FailureStatus.TRIAGED


def test_budget_takes_high_risk_first_and_skipped_ones_come_back(tctx: Context) -> None:
    store = tctx.store
    rejects = [make(n, *TOPICS[n], qa_verdict="Reject") for n in range(3)]
    downs = [make(n, *TOPICS[n], feedback="down") for n in range(3, 12)]
    interaction_repo.insert(store, rejects + downs)

    first = triage(tctx, budget=5)
    assert (first.captured, first.clusters, first.eligible, first.taken, first.skipped) == (12, 12, 12, 5, 7)
    found = all_failures(store)
    status = Counter(f.status for f in found.values())
    assert status == {FailureStatus.TRIAGED: 5, FailureStatus.SKIPPED: 7}
    assert all(found[r.id].status == FailureStatus.TRIAGED for r in rejects)  # risk 5 >= must_take_risk 3

    second = triage(tctx, budget=5)
    assert (second.captured, second.eligible, second.taken, second.skipped) == (0, 7, 5, 2)
    third = triage(tctx, budget=5)
    assert (third.eligible, third.taken, third.skipped) == (2, 2, 0)
    assert all(f.status == FailureStatus.TRIAGED for f in all_failures(store).values())


def test_a_lost_index_is_rebuilt_from_the_store(tctx: Context) -> None:
    interaction_repo.insert(tctx.store, [make(n, *TOPICS[n], feedback="down") for n in range(4)])
    triage(tctx)
    ids = [h.id for h in tctx.index.get("failures")]
    tctx.index.delete("failures", ids[:3])
    summary = triage(tctx)
    assert summary.reindexed == 3 and tctx.index.count("failures") == 4
    # and duplicates still find their representative through the rebuilt entries
    interaction_repo.insert(tctx.store, [make(30, "How can I reset my password?", TOPICS[0][1], feedback="down")])
    assert triage(tctx).duplicates == 1


# --- sampling ------------------------------------------------------------------------------------------


def test_sampling_respects_budget_and_must_take() -> None:
    clusters = [(f"c{i:02d}", 1.0) for i in range(20)] + [("hi1", 8.0), ("hi2", 5.0), ("hi3", 3.0)]
    taken, skipped = select_within_budget(clusters, budget=6, must_take_risk=3.0, seed=0)
    assert len(taken) == 6 and len(skipped) == 17 and set(taken).isdisjoint(skipped)
    assert taken[:3] == ["hi1", "hi2", "hi3"]
    # Too many must-takes: the riskiest win.
    taken, _ = select_within_budget(clusters, budget=2, must_take_risk=3.0, seed=0)
    assert taken == ["hi1", "hi2"]
    # Under budget: everything.
    assert select_within_budget(clusters[:3], budget=5, must_take_risk=3.0, seed=0) == (["c00", "c01", "c02"], [])


def test_sampling_is_seeded_and_independent_of_input_order() -> None:
    clusters = [(f"c{i:02d}", 1.0 + (i % 3)) for i in range(30)]
    a = select_within_budget(clusters, budget=10, must_take_risk=99, seed=7)
    b = select_within_budget(list(reversed(clusters)), budget=10, must_take_risk=99, seed=7)
    c = select_within_budget(clusters, budget=10, must_take_risk=99, seed=8)
    assert a == b and a != c


def test_sampling_probability_follows_risk() -> None:
    # One place, weights 3:1:1 -> the heavy one is drawn with probability 3/5.
    clusters = [("heavy", 3.0), ("light1", 1.0), ("light2", 1.0)]
    draws = Counter(select_within_budget(clusters, budget=1, must_take_risk=99, seed=s)[0][0] for s in range(3000))
    assert 0.56 < draws["heavy"] / 3000 < 0.64
    assert abs(draws["light1"] - draws["light2"]) < 150


# --- the command -----------------------------------------------------------------------------------------


def test_cli_triage(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(project)
    ctx = Context(settings=settings)
    interaction_repo.insert(ctx.store, [make(n, *TOPICS[n], qa_verdict="Risk") for n in range(3)])
    ctx.close()
    assert main(["-C", str(project), "triage", "--budget", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["captured"], summary["taken"], summary["skipped"], summary["by_rule"]) == (3, 2, 1, {"qa_risk": 3})
    assert main(["-C", str(project), "triage"]) == 0
    assert "budget 2000: 1 eligible clusters, 1 triaged, 0 skipped" in capsys.readouterr().out
