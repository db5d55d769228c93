"""Synthesis end to end on a real store, index and embedding model: every scorer check drops what it
should, kept samples enter a snapshot under their caps, a re-run adds nothing, bad inputs are reported."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from flywheel.cli import main
from flywheel.context import Context
from flywheel.data.labels import add_label
from flywheel.records import Correction, Failure, Interaction, Message, Verdict, Verification
from flywheel.settings import load_settings
from flywheel.store import interactions as interaction_repo
from flywheel.store import synthetic as synthetic_repo
from flywheel.store.failures import insert_failures, save_correction, save_verdict
from flywheel.synthesis.records import Generated
from flywheel.synthesis.scorer import Pool, Scorer
from flywheel.synthesis.stage import shortfall, synthesize
from flywheel.trainer.dataset import build_snapshot, read_rows

INTENTS = ["card_arrival", "exchange_rate", "lost_card"]
LABELLED = {
    "card_arrival": [
        "When will my new card arrive?",
        "My card still has not arrived",
        "How long does card delivery take?",
        "Where is my card?",
    ],
    "exchange_rate": [
        "What exchange rate do you use?",
        "Is the exchange rate fair?",
        "How is the currency rate set?",
        "Which rate applies when I exchange?",
    ],
    "lost_card": [
        "I lost my card",
        "My card was stolen yesterday",
        "Someone took my wallet with my card",
        "I cannot find my card anywhere",
    ],
}
UNLABELLED = {  # captured failures nobody labelled; the production model logged a wrong intent for each
    "card_arrival": ["when does my card arrive", "my new card has not arrived yet"],
    "lost_card": ["i think i lost my card", "my card got stolen"],
}
TEST_PROMPTS = ["When will my card arrive?", "my card was stolen"]


def answer(intent: str) -> str:
    return json.dumps({"intent": intent, "reply": f"Here is how we handle {intent.replace('_', ' ')}."})


SCHEMA = {
    "type": "object",
    "properties": {"intent": {"type": "string", "enum": INTENTS}, "reply": {"type": "string", "minLength": 1}},
    "required": ["intent", "reply"],
    "additionalProperties": False,
}


def _conversation(user: str, reply: str) -> list[Message]:
    return [
        Message(role="system", content="You are a bank's support agent."),
        Message(role="user", content=user),
        Message(role="assistant", content=reply),
    ]


def seed_world(ctx: Context) -> None:
    """Labelled failures with verified corrections, and unlabelled captured failures."""
    n = 0
    with ctx.store.begin() as conn:
        for intent, users in [*LABELLED.items(), *UNLABELLED.items()]:
            for user in users:
                n += 1
                wrong = INTENTS[(INTENTS.index(intent) + 1) % len(INTENTS)]
                interaction = Interaction(
                    id=f"i{n:03d}",
                    timestamp="2026-01-01T00:00:00Z",
                    model_version="v1",
                    intent=wrong,
                    messages=_conversation(user, answer(wrong)),
                    content_hash=f"h{n:03d}",
                )
                interaction_repo.insert_ignore(conn, [interaction_repo.to_row(interaction)])
                fid = f"f{n:03d}"
                insert_failures(
                    conn, [Failure(id=fid, interaction_id=interaction.id, rule="thumbs_down", first_seen_version="v1", intent=wrong)]
                )
                if user in LABELLED.get(intent, []):
                    save_verdict(
                        conn, Verdict(failure_id=fid, is_failure=True, problem_type="wrong_intent", severity="medium", judge="rule")
                    )
                    save_correction(
                        conn,
                        Correction(
                            failure_id=fid,
                            answer=answer(intent),
                            generator="label:test",
                            verification=Verification(passed=True, verifier="rule"),
                        ),
                    )
    for failure_id, intent in _labelled_ids():
        add_label(ctx.store, failure_id, {"intent": intent}, "tester")


def _labelled_ids() -> list[tuple[str, str]]:
    out, n = [], 0
    for intent, users in [*LABELLED.items(), *UNLABELLED.items()]:
        for user in users:
            n += 1
            if user in LABELLED.get(intent, []):
                out.append((f"f{n:03d}", intent))
    return out


@pytest.fixture
def world(project: Path) -> Iterator[Context]:
    test_set = project / "test_set.jsonl"
    test_set.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": p}], "reference": {"intent": "card_arrival"}}) + "\n"
            for i, p in enumerate(TEST_PROMPTS)
        ),
        encoding="utf-8",
    )
    settings = load_settings(
        project,
        policies={"output_schema": SCHEMA},
        eval={"test_set": str(test_set)},
        synthesis={"mining_k": 3, "mining_agreement": 0.6, "mining_min_similarity": 0.5, "per_seed": 2, "min_verified": 6},
        dataset={
            "production_replay_rows": 0,
            "heldout_ratio": 0.0,
            "intent_max_ratio": 1.0,
            "intent_min_samples": 0,
            "replay_min_share": 0.0,
        },
    )
    ctx = Context(settings=settings)
    seed_world(ctx)
    yield ctx
    ctx.close()


def fixed_perplexity(value: float):
    return lambda samples: [value] * len(samples)


# --- the scorer, check by check ------------------------------------------------------------------------------


def _generated(user: str, intent: str, *, source: str | None = None, reply: str | None = None, generator: str = "augment") -> Generated:
    return Generated(
        generator=generator,
        source_id="f001" if source else None,
        source_text=source,
        intent=intent,
        problem_type="wrong_intent",
        messages=[Message(role="user", content=user)],
        answer=reply if reply is not None else answer(intent),
    )


def _pool(ctx: Context) -> Pool:
    from flywheel.synthesis.stage import build_pool, verified_seeds

    return build_pool(ctx, verified_seeds(ctx))


def test_each_check_drops_what_it_should_and_keeps_a_good_sample(world: Context) -> None:
    from flywheel.evals.rule_judge import RuleJudge

    scorer = Scorer(world.settings, world.index.embedder.embed, RuleJudge(world.settings), perplexity=fixed_perplexity(5.0))
    samples = {
        "good": _generated("hey, when is my new card going to arrive??", "card_arrival", source="When will my new card arrive?"),
        "exact": _generated("When will my new card arrive?", "card_arrival"),
        "leak": _generated("when will my card arrive", "card_arrival"),
        "drift": _generated("What is the weather like in Paris today?", "card_arrival", source="When will my new card arrive?"),
        "rule": _generated("is the exchange rate fair to me?", "exchange_rate", reply='{"intent": "exchange_rate"}'),
        "knn": _generated("I lost my card on the bus", "exchange_rate"),
    }
    by_name = {name: s for name, s in zip(samples, scorer.score(list(samples.values()), _pool(world)))}
    assert by_name["good"].kept and by_name["good"].scores["perplexity"] == 5.0, by_name["good"]
    assert by_name["exact"].reasons[0].startswith("exact_duplicate")
    assert by_name["leak"].reasons[0].startswith("test_set_leak")
    assert any(r.startswith("drift") for r in by_name["drift"].reasons)
    assert any(r.startswith("rule_judge") for r in by_name["rule"].reasons)
    assert any(r.startswith("label_inconsistent") for r in by_name["knn"].reasons), by_name["knn"]
    assert not any(s.kept for name, s in by_name.items() if name != "good")


def test_perplexity_outside_the_band_is_dropped(world: Context) -> None:
    from flywheel.evals.rule_judge import RuleJudge

    world.settings.synthesis.min_perplexity = 1.5
    sample = [_generated("hey, when is my new card going to arrive??", "card_arrival", source="When will my new card arrive?")]
    for value, reason in ((5000.0, "perplexity_high"), (1.01, "perplexity_low")):
        scorer = Scorer(world.settings, world.index.embedder.embed, RuleJudge(world.settings), perplexity=fixed_perplexity(value))
        (scored,) = scorer.score(sample, _pool(world))
        assert not scored.kept and scored.reasons[0].startswith(reason)


def test_preference_predictor_drops_what_people_would_reject(world: Context) -> None:
    from flywheel.evals.rule_judge import RuleJudge

    def prefers_card_arrival(users: Sequence[str], answers: Sequence[str]) -> Any:
        import numpy as np

        return np.array([0.9 if "card_arrival" in a else 0.05 for a in answers])

    scorer = Scorer(world.settings, world.index.embedder.embed, RuleJudge(world.settings), preference=prefers_card_arrival)
    kept, dropped = scorer.score(
        [
            _generated("hey, when is my new card going to arrive??", "card_arrival", source="When will my new card arrive?"),
            _generated("hello, my card was stolen from my bag", "lost_card", source="My card was stolen yesterday"),
        ],
        _pool(world),
    )
    assert kept.kept and kept.scores["preference"] == 0.9
    assert dropped.reasons == ["preference: 0.050 below 0.2"]


# --- the stage on a real store -------------------------------------------------------------------------------


def test_mining_pseudo_labels_unlabelled_failures_and_a_rerun_adds_nothing(world: Context) -> None:
    summary = synthesize(world, ["mining"], perplexity=fixed_perplexity(3.0))
    mined = synthetic_repo.listing(world.store, generator="mining", limit=100)
    by_text = {next(m["content"] for m in r["messages"] if m["role"] == "user"): r for r in mined}
    assert by_text["i think i lost my card"]["intent"] == "lost_card" and by_text["i think i lost my card"]["kept"]
    assert by_text["i think i lost my card"]["rejected"] == answer("card_arrival")  # what production logged: the pair's other side
    assert by_text["my new card has not arrived yet"]["intent"] == "card_arrival" and by_text["my new card has not arrived yet"]["kept"]
    for near_test in ("my card got stolen", "when does my card arrive"):  # near copies of the fixed test set's prompts
        assert not by_text[near_test]["kept"] and by_text[near_test]["reasons"][0].startswith("test_set_leak")
    assert summary.new == len(mined) == 4 and summary.generators["mining"].dropped == {"test_set_leak": 2}
    again = synthesize(world, ["mining"], perplexity=fixed_perplexity(3.0))
    assert again.new == 0 and again.generated == summary.generated
    assert len(synthetic_repo.listing(world.store, limit=100)) == len(mined)


def test_dry_run_stores_nothing(world: Context) -> None:
    summary = synthesize(world, ["mining", "augment"], dry_run=True, perplexity=fixed_perplexity(3.0))
    assert summary.generated > 0 and summary.new == 0
    assert synthetic_repo.listing(world.store) == []


def test_kept_samples_enter_the_snapshot_weighted_and_capped(world: Context) -> None:
    synthesize(world, ["mining", "augment"], perplexity=fixed_perplexity(3.0))
    kept = [r for r in synthetic_repo.listing(world.store, limit=1000) if r["kept"]]
    assert kept
    world.settings.synthesis.max_share = 0.25
    snapshot = build_snapshot(world, "sft")
    rows = read_rows(snapshot)
    generated = [r for r in rows if r["source"] == "synthetic"]
    real = [r for r in rows if r["source"] != "synthetic"]
    assert generated and all(r["origin"].startswith("synthetic:") for r in generated)
    assert len(generated) <= 0.25 * len(rows) + 1e-9
    # the same problem type, so the same category weight: generated rows weigh synthesis.weight (0.5) of a real row
    (real_weight,) = {r["weight"] for r in real}
    assert {r["weight"] for r in generated} == {0.5 * real_weight}
    test_texts = {p.lower().strip("?") for p in TEST_PROMPTS}
    assert not any(m["content"].lower().strip("?") in test_texts for r in rows for m in r["messages"] if m["role"] == "user")
    assert snapshot.manifest["sources"]["synthetic"] and "synthetic_share_cap" in {s["step"] for s in snapshot.manifest["steps"]}
    assert all(r["tier"] == "problem" for r in generated)  # never a baseline row
    dpo = read_rows(build_snapshot(world, "dpo"))
    mined = [r for r in dpo if r["origin"] == "synthetic:mining"]
    assert mined and all(r["rejected"][0]["content"] != r["chosen"][0]["content"] for r in mined)
    assert not any(r["origin"] == "synthetic:augment" for r in dpo)  # no failing answer to pair with


def test_shortfall_names_short_intents_and_problem_types(world: Context) -> None:
    # 4 verified samples per intent, 12 of wrong_intent; min_verified is 6
    assert shortfall(world) == {"card_arrival": 2, "exchange_rate": 2, "lost_card": 2}
    world.settings.synthesis.min_verified = 13
    assert shortfall(world) == {"card_arrival": 9, "exchange_rate": 9, "lost_card": 9, "problem_type:wrong_intent": 1}


# --- the command --------------------------------------------------------------------------------------------


def test_synthesize_command_reports_a_bad_template_and_keeps_the_rest(
    world: Context, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    templates = project / "templates.jsonl"
    templates.write_text(
        json.dumps({"intent": "exchange_rate", "template": "what rate do I get for {currency}?"})
        + "\n{not json\n"
        + json.dumps({"intent": "lost_card", "template": "I lost my {card_type"})
        + "\n",
        encoding="utf-8",
    )
    config = project / "flywheel.toml"
    config.write_text('[synthesis]\ntemplates = "templates.jsonl"\nmin_verified = 6\n', encoding="utf-8")
    world.close()
    code = main(["-C", str(project), "synthesize", "-g", "template", "--json"])
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert code == 2 and "bad input" in out.err
    sources = {p["source"] for p in summary["problems"]}
    assert any(s.endswith("templates.jsonl:2") for s in sources) and any(s.endswith("templates.jsonl:3") for s in sources)
    assert summary["generators"]["template"]["generated"] > 0


def test_synthetic_command_says_why_a_sample_was_dropped(world: Context, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthesize(world, ["mining"], perplexity=fixed_perplexity(3.0))
    world.close()
    assert main(["-C", str(project), "synthetic", "--dropped"]) == 0
    assert "test_set_leak" in capsys.readouterr().out


def test_migrations_match_the_schema(settings: Any) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from flywheel.store.db import open_store
    from flywheel.store.schema import metadata

    store = open_store(settings)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        store.dispose()
    assert diff == []


# --- the supervisor's step -------------------------------------------------------------------------------------


def _next_call(ctx: Context) -> str:
    from flywheel.agent.policies import HeuristicPolicy
    from flywheel.tools.registry import build_tools

    done = ["triage_new_logs", "request_labels", "judge_failures", "generate_corrections"]
    state: Any = {"trigger": "run", "messages": [], "cycle": {"done": done}}
    message = HeuristicPolicy(ctx.settings).decide(state, build_tools(ctx))
    return message.tool_calls[0]["name"]


def test_the_heuristic_policy_synthesizes_only_when_enabled_and_short(world: Context) -> None:
    assert _next_call(world) == "build_dataset"  # synthesis is off by default
    world.settings.synthesis.enabled = True
    assert _next_call(world) == "synthesize_samples"  # every intent has 4 verified samples, 6 are wanted
    world.settings.synthesis.min_verified = 4
    assert _next_call(world) == "build_dataset"  # nothing is short


def test_generated_text_is_scrubbed_of_pii_before_it_is_stored(world: Context, project: Path) -> None:
    templates = project / "pii-templates.jsonl"
    templates.write_text(
        json.dumps({"intent": "card_arrival", "template": "I am Jane Doe, jane.doe@example.com, where is my {card_type}?"}) + "\n",
        encoding="utf-8",
    )
    world.settings.synthesis.templates = str(templates)
    synthesize(world, ["template"], perplexity=fixed_perplexity(3.0))
    rows = synthetic_repo.listing(world.store, generator="template", limit=1000)
    texts = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    from_file = [t for t in texts if "where is my" in t and t.startswith("I am")]
    assert from_file, texts
    assert not any("jane.doe@example.com" in t or "Jane Doe" in t for t in texts)
