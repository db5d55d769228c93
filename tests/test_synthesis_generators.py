"""The rule-based synthesis generators (template, augment, knowledge) and the entity finder they share,
on real records: what they write, what they report, and that the same inputs give the same samples."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flywheel.records import Interaction, Message
from flywheel.settings import Settings
from flywheel.synthesis import augment, knowledge, template
from flywheel.synthesis.entities import DEFAULTS, find_entities, slot_values, swap_entity, with_defaults
from flywheel.synthesis.records import Seed, SynthesisInputs

SYSTEM = Message(role="system", content="You are the bank's support assistant.")
CARD_ANSWER = '{"action": "check_card", "reply": "Let me check why the card was declined."}'


def seed(id: str, intent: str, text: str, answer: str, problem_type: str = "wrong_answer") -> Seed:
    messages = [SYSTEM, Message(role="user", content=text)]
    return Seed(id=id, intent=intent, problem_type=problem_type, messages=messages, answer=answer, origin="label")


SEEDS = [
    seed("f-1", "card_declined", "My visa was declined yesterday in London", CARD_ANSWER),
    seed("f-2", "card_declined", "I can't pay with my credit card because it says declined.", CARD_ANSWER),
    seed(
        "f-3", "refund_status", "I paid £12.50 last Tuesday and I want my refund", "Your refund of £12.50 is on its way.", "hallucination"
    ),
    seed("f-4", "refund_status", "Where is my refund? I returned the shoes so I expect it now.", "Refunds take 5 business days."),
]


def inputs(tmp_path: Path, seeds: list[Seed] = SEEDS, **fields: Any) -> SynthesisInputs:
    settings = Settings(project_dir=tmp_path)
    settings.synthesis.per_seed = fields.pop("per_seed", 3)
    settings.synthesis.per_intent = fields.pop("per_intent", 40)
    settings.synthesis.templates = fields.pop("templates", "")
    return SynthesisInputs(settings=settings, seeds=seeds, **fields)


def frame(text: str) -> str:
    """The sentence with every entity replaced by its kind: what an entity swap must keep."""
    for entity in reversed(find_entities(text)):
        text = text[: entity.start] + "{" + entity.kind + "}" + text[entity.end :]
    return text


# --- entities ---------------------------------------------------------------------------------------------


def test_entities_are_found_by_kind_without_overlaps() -> None:
    text = "I paid £12.50 and 100 EUR with my Visa debit card in New York last Tuesday; do you take USD or euros?"
    found = [(e.kind, e.text) for e in find_entities(text)]
    assert found == [
        ("amount", "£12.50"),
        ("amount", "100 EUR"),
        ("card_type", "Visa debit card"),
        ("city", "New York"),
        ("date", "last Tuesday"),
        ("currency", "USD"),
        ("currency", "euros"),
    ]
    assert all(text[e.start : e.end] == e.text for e in find_entities(text))
    # a capitalised word after "in" is a city only when it is known to be one
    assert find_entities("I am stuck in Settings") == [] and find_entities("I live in Lyon")[0].text == "Lyon"
    assert find_entities("I live in Faro", cities={"Faro"})[0].kind == "city"


def test_slot_values_are_distinct_sorted_and_topped_up() -> None:
    values = slot_values(["Paid 20 euros on 12/03/2024 with my VISA", "paid with visa in Paris", "visa again, 20 euros"])
    assert values["amount"] == ["20 euros"] and values["date"] == ["12/03/2024"] and values["city"] == ["Paris"]
    assert values["card_type"] == ["visa"]  # one value however it was written; the usual spelling, not the shouted one
    filled = with_defaults(values)
    assert filled["amount"][0] == "20 euros" and len(filled["amount"]) == 4 and set(filled["amount"][1:]) <= set(DEFAULTS["amount"])
    assert filled["currency"] == list(DEFAULTS["currency"][:4])  # nothing seen: the built-in values


def test_swap_entity_keeps_the_sentence_and_the_answers_entities() -> None:
    text = "I paid £12.50 with my visa yesterday"
    for n in range(10):
        swapped = swap_entity(text, random.Random(n), with_defaults({}), keep="your refund of £12.50 is on its way")
        assert swapped is not None
        new, kind = swapped
        assert kind != "amount" and "£12.50" in new and frame(new) == frame(text) and new != text


# --- augment ----------------------------------------------------------------------------------------------


def test_augment_variants_keep_answer_intent_and_differ(tmp_path: Path) -> None:
    out = augment.generate(inputs(tmp_path))
    assert out.problems == []
    by_seed = {s.id: s for s in SEEDS}
    assert {g.source_id for g in out.samples} == set(by_seed)
    for sample in out.samples:
        source = by_seed[str(sample.source_id)]
        assert (sample.answer, sample.intent, sample.problem_type) == (source.answer, source.intent, source.problem_type)
        assert sample.generator == "augment" and sample.kind == "reply" and sample.source_text == source.last_user()
        assert sample.messages[0] == SYSTEM and sample.last_user() != source.last_user()
        assert sample.params["ops"] and all(isinstance(op, str) for op in sample.params["ops"])
    for seed_id in by_seed:
        texts = [g.last_user() for g in out.samples if g.source_id == seed_id]
        assert len(texts) == 3 and len(set(texts)) == 3


def test_augment_entity_swaps_keep_the_frame_and_answer_entities(tmp_path: Path) -> None:
    out = augment.generate(inputs(tmp_path, per_seed=30))
    swaps = [g for g in out.samples if g.params["ops"][0].startswith("entity_swap") and len(g.params["ops"]) == 1]
    assert swaps, "30 variants per seed include plain entity swaps"
    for sample in swaps:
        assert frame(sample.last_user()) == frame(str(sample.source_text))
    # the refund answer names £12.50: no variant of that seed changes the amount
    assert all("£12.50" in g.last_user() for g in out.samples if g.source_id == "f-3")
    ops = {op.split(":")[0] for g in out.samples for op in g.params["ops"]}
    assert {"entity_swap", "add_politeness", "expand_contractions", "reorder"} <= ops
    assert ops & {"typo_swap", "typo_keyboard", "typo_drop"} and ops & {"mixed_case", "chat_spelling", "drop_apostrophes"}


def test_augment_rewrites_read_right() -> None:
    ctx = augment.Context(values=with_defaults({}), cities=(), answer="")
    rng = random.Random(0)
    assert augment.expand_contractions("I can't pay and I'm stuck", rng, ctx) == ("I cannot pay and I am stuck", "expand_contractions")
    assert augment.contract("I do not know where they are.", rng, ctx) == ("I don't know where they are.", "contract")
    assert augment.reorder_clauses("I lost my card so I need a new one.", rng, ctx) == (
        "Because I lost my card, I need a new one.",
        "reorder:so",
    )
    assert augment.reorder_clauses("Because the app crashed, I could not pay.", rng, ctx) == (
        "I could not pay because the app crashed.",
        "reorder:because",
    )
    assert augment.reorder_clauses("Hi, I paid but it is pending, why?", rng, ctx) is None  # more than one clause boundary
    assert augment.passive("I sent the money to Anna yesterday.", rng, ctx) == ("The money was sent by me to Anna yesterday.", "passive")
    assert augment.passive("I love the app", rng, ctx) is None
    assert augment.drop_apostrophes("I can't log in", rng, ctx) == ("I cant log in", "drop_apostrophes")


def test_augment_is_deterministic_and_follows_the_seed(tmp_path: Path) -> None:
    first = augment.generate(inputs(tmp_path))
    again = augment.generate(inputs(tmp_path, seeds=list(reversed(SEEDS))))
    assert [g.id for g in first.samples] == [g.id for g in again.samples]
    other = augment.generate(inputs(tmp_path, seed=1))
    assert {g.last_user() for g in other.samples} != {g.last_user() for g in first.samples}


def test_augment_takes_only_wanted_intents_and_reply_seeds(tmp_path: Path) -> None:
    out = augment.generate(inputs(tmp_path, wants={"refund_status": 5}))
    assert {g.intent for g in out.samples} == {"refund_status"} and len(out.samples) == 6
    empty = seed("f-5", "refund_status", "", "Refunds take 5 business days.")
    tool = Seed(
        id="f-6",
        intent="refund_status",
        problem_type="wrong_answer",
        messages=[Message(role="user", content="Where is my refund?"), Message(role="tool", content="{}", tool_call_id="c1")],
        answer="It is on its way.",
        origin="label",
    )
    assert augment.generate(inputs(tmp_path, seeds=[empty, tool])).samples == []


# --- template ---------------------------------------------------------------------------------------------

TEMPLATE_LINES = [
    {"intent": "card_declined", "template": "My {card_type} was declined in {city}"},
    {"intent": "card_declined", "template": "Charged {amount twice"},  # 2: unbalanced
    {"intent": "exchange_rate", "template": "How many {currency} do I get for {amount}?", "answer": "Rates are on the rates page."},
    "not json at all",  # 4
    {"intent": "card_declined", "template": "my {cardtype} broke"},  # 5: unknown slot
    {"intent": "card_declined", "template": "  "},  # 6: empty
    {"intent": "card_declined", "template": "ok {city}", "tone": "calm"},  # 7: unknown key
    {"template": "I want {amount} back"},  # 8: intent missing
    {"intent": "lost_card", "template": "I lost my {card_type} in {city}"},  # 9: no answer anywhere
]


def write_templates(tmp_path: Path) -> Path:
    path = tmp_path / "templates.jsonl"
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in TEMPLATE_LINES) + "\n", encoding="utf-8")
    return path


def test_template_file_bad_lines_are_reported_and_good_ones_used(tmp_path: Path) -> None:
    path = write_templates(tmp_path)
    out = template.generate(inputs(tmp_path, templates="templates.jsonl", per_intent=5))  # relative to the project
    assert [p.source for p in out.problems] == [f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8, 9)]
    problems = {p.source.rsplit(":", 1)[1]: p.problem for p in out.problems}
    assert "unbalanced" in problems["2"] and "not valid JSON" in problems["4"] and "{cardtype}" in problems["5"]
    assert "empty" in problems["6"] and "tone" in problems["7"] and "intent" in problems["8"] and "no answer" in problems["9"]

    rates = [g for g in out.samples if g.intent == "exchange_rate"]
    assert len(rates) == 5 and len({g.last_user() for g in rates}) == 5
    for sample in rates:
        assert sample.source_id == f"{path}:3" and sample.answer == "Rates are on the rates page."
        assert "{" not in sample.last_user() and sample.params["template"] == TEMPLATE_LINES[2]["template"]  # type: ignore[index]
        assert [kind for kind, _ in sample.params["slots"]] == ["currency", "amount"]
        # no seed of the intent: the system prompt of any seed, the problem type "synthetic"
        assert sample.messages == [SYSTEM, Message(role="user", content=sample.last_user())] and sample.problem_type == "synthetic"

    cards = [g for g in out.samples if g.intent == "card_declined"]
    assert len(cards) == 5 and all(g.answer == CARD_ANSWER and g.problem_type == "wrong_answer" for g in cards)
    assert {g.source_id for g in cards} == {f"{path}:1", "f-1", "f-2"}  # the file's template and the two seeds'


def test_template_missing_file_is_one_problem(tmp_path: Path) -> None:
    out = template.generate(inputs(tmp_path, templates=str(tmp_path / "absent.jsonl"), per_intent=2))
    assert [(p.source, "no such file" in p.problem) for p in out.problems] == [(str(tmp_path / "absent.jsonl"), True)]
    assert len(out.samples) == 4  # the seeds' templates still work: 2 intents, 2 each


def test_seed_templates_fill_slots_from_traffic_and_follow_wants(tmp_path: Path) -> None:
    traffic = [
        Interaction(id=f"i-{n}", timestamp=datetime(2024, 5, 1, tzinfo=UTC), messages=[Message(role="user", content=text)])
        for n, text in enumerate(["My amex got declined in Berlin", "is my mastercard blocked?"])
    ]
    out = template.generate(inputs(tmp_path, unlabelled=traffic, wants={"card_declined": 6, "refund_status": 0}, per_intent=4))
    assert len(out.samples) == 4 and {g.intent for g in out.samples} == {"card_declined"}  # min(want, per_intent)
    by_seed = {s.id: s for s in SEEDS}
    for sample in out.samples:
        source = by_seed[str(sample.source_id)]
        # the seed's prompt with its user turn replaced; the slots hold values seen in traffic or built in
        assert sample.messages[:-1] == source.messages[:-1] and sample.last_user() != source.last_user()
        assert frame(sample.last_user()) == frame(source.last_user())
        pool = with_defaults(slot_values(["My amex got declined in Berlin", "is my mastercard blocked?"]))
        assert all(value in pool[kind] for kind, value in sample.params["slots"])
    assert "{card_type}" in out.samples[0].params["template"]


def test_template_answer_falls_back_to_the_kb(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"intent": "lost_card", "template": "I lost my {card_type}"}) + "\n", encoding="utf-8")
    kb = [{"id": "kb-1", "kind": "approved_response", "intent": "lost_card", "title": "Lost card", "text": "Freeze it in the app."}]
    out = template.generate(inputs(tmp_path, seeds=[], kb=kb, templates=str(path), per_intent=3))
    assert out.problems == [] and len(out.samples) == 3
    assert all(g.answer == "Freeze it in the app." and g.messages[0].role == "user" for g in out.samples)


def test_template_is_deterministic(tmp_path: Path) -> None:
    write_templates(tmp_path)
    ids = [g.id for g in template.generate(inputs(tmp_path, templates="templates.jsonl")).samples]
    assert ids == [g.id for g in template.generate(inputs(tmp_path, seeds=list(reversed(SEEDS)), templates="templates.jsonl")).samples]
    other = template.generate(inputs(tmp_path, templates="templates.jsonl", seed=7)).samples
    assert [g.last_user() for g in other] != [
        g.last_user() for g in template.generate(inputs(tmp_path, templates="templates.jsonl")).samples
    ]


# --- knowledge --------------------------------------------------------------------------------------------

KB = [
    {
        "id": "kb-refund",
        "kind": "approved_response",
        "intent": "refund_status",
        "title": "Where is my refund?",
        "text": '{"reply": "5 days"}',
    },
    {"id": "kb-fees", "kind": "doc", "intent": None, "title": "Card fees", "text": "Cards cost nothing to hold."},
    {"id": "kb-policy", "kind": "policy", "intent": "refund_status", "title": "Refunds", "text": "Never promise a date."},
    {
        "id": "kb-gold",
        "kind": "fact",
        "intent": "pricing",
        "title": "",
        "head": "Gold plan",
        "relation": "monthly_price",
        "tail": "£12",
        "text": "x",
    },
    {
        "id": "kb-hq",
        "kind": "fact",
        "intent": None,
        "title": "",
        "head": "Acme",
        "relation": "is headquartered in",
        "tail": "Lisbon",
        "text": "x",
    },
    {
        "id": "kb-silver",
        "kind": "fact",
        "intent": "pricing",
        "title": "",
        "head": "Silver plan",
        "relation": "monthly price",
        "tail": "",
        "source": "kb.jsonl:7",
    },
    {
        "id": "kb-plat",
        "kind": "fact",
        "intent": "pricing",
        "title": "",
        "head": "Platinum plan",
        "relation": "monthly price",
        "tail": "£12",
        "text": "x",
    },
]


def test_knowledge_turns_entries_and_triples_into_pairs(tmp_path: Path) -> None:
    out = knowledge.generate(inputs(tmp_path, kb=KB))
    assert [(p.source, p.problem) for p in out.problems] == [("kb-silver (kb.jsonl:7)", "fact triple missing tail")]
    pairs = {(g.source_id, g.last_user()): g for g in out.samples}
    refund = [g for g in out.samples if g.source_id == "kb-refund"]
    assert [g.last_user() for g in refund] == [
        "Where is my refund?",
        "Quick question: Where is my refund?",
        "Hi, I was wondering: Where is my refund?",
    ]
    assert all(g.answer == '{"reply": "5 days"}' and g.intent == "refund_status" for g in refund)  # the JSON answer verbatim
    assert pairs[("kb-fees", "Can you help me with Card fees?")].answer == "Cards cost nothing to hold."
    assert pairs[("kb-fees", "Can you help me with Card fees?")].intent == "knowledge"
    gold = pairs[("kb-gold", "What is the monthly price of Gold plan?")]
    assert (gold.answer, gold.intent, gold.params) == (
        "The monthly price of Gold plan is £12.",
        "pricing",
        {"kind": "fact", "direction": "forward"},
    )
    # two plans cost £12: "What has £12 as its monthly price?" has no single answer, so it is not asked
    assert not [g for g in out.samples if g.params.get("direction") == "inverse" and g.source_id in ("kb-gold", "kb-plat")]
    assert pairs[("kb-hq", "What is headquartered in Lisbon?")].answer == "Acme is headquartered in Lisbon."
    assert ("kb-hq", "What is Acme headquartered in?") in pairs
    assert not [g for g in out.samples if g.source_id in ("kb-policy", "kb-silver")]
    assert {g.problem_type for g in out.samples} == {"missing_knowledge"}
    assert all(g.messages[0] == SYSTEM for g in out.samples)


def test_knowledge_respects_per_intent_and_is_deterministic(tmp_path: Path) -> None:
    out = knowledge.generate(inputs(tmp_path, kb=KB, per_intent=2))
    counts = {intent: sum(g.intent == intent for g in out.samples) for intent in {g.intent for g in out.samples}}
    assert counts == {"refund_status": 2, "knowledge": 2, "pricing": 2}
    shuffled = knowledge.generate(inputs(tmp_path, kb=list(reversed(KB)), per_intent=2))
    assert [g.id for g in shuffled.samples] == [g.id for g in out.samples]


# --- neighbours -------------------------------------------------------------------------------------------


def _stable(n: int, intent: str, text: str, answer: str) -> Interaction:
    return Interaction(
        id=f"s-{intent}-{n}",
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        intent=intent,
        messages=[SYSTEM, Message(role="user", content=text), Message(role="assistant", content=answer)],
    )


def test_neighbours_vary_the_stable_answers_of_the_intents_next_to_a_short_one(tmp_path: Path, monkeypatch: Any) -> None:
    from flywheel.store.vectors import Embedder
    from flywheel.synthesis import neighbours

    monkeypatch.setattr(neighbours, "NEIGHBOURS", 1)
    stable = [
        _stable(1, "get_virtual_card", "How do I get a virtual card?", "Open Cards and tap Get a virtual card."),
        _stable(2, "get_virtual_card", "Can I have a virtual card please", "Open Cards and tap Get a virtual card."),
        _stable(3, "exchange_rate", "What exchange rate do you use for euros?", "We use the interbank rate."),
    ]
    short = [
        seed("f-9", "disposable_virtual_card", "I want a disposable virtual card for one payment", "Disposable cards are under Cards.")
    ]
    out = neighbours.generate(
        inputs(tmp_path, short, stable=stable, embed=Embedder().embed, wants={"disposable_virtual_card": 10}, per_seed=2)
    )
    assert out.samples and {s.intent for s in out.samples} == {"get_virtual_card"}  # the neighbour, not the far intent
    assert all(s.generator == "neighbours" and s.answer == "Open Cards and tap Get a virtual card." for s in out.samples)
    assert {s.source_id for s in out.samples} == {"s-get_virtual_card-1", "s-get_virtual_card-2"}
    again = neighbours.generate(
        inputs(tmp_path, short, stable=stable, embed=Embedder().embed, wants={"disposable_virtual_card": 10}, per_seed=2)
    )
    assert [s.id for s in again.samples] == [s.id for s in out.samples]
    assert neighbours.generate(inputs(tmp_path, short, stable=stable, embed=Embedder().embed)).samples == []  # nothing wants samples
