"""Dataset snapshots: every balancing rule measured on the rows it writes, on a real store."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flywheel.cli import main
from flywheel.context import Context
from flywheel.errors import UserInputError
from flywheel.records import Correction, Failure, Interaction, Message, SampleTier, Verdict, Verification
from flywheel.settings import load_settings
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.failures import insert_failures, move_tier, save_correction, save_verdict
from flywheel.trainer.balance import bucket_cap
from flywheel.trainer.dataset import build_snapshot, get_snapshot, list_snapshots, read_rows
from flywheel.trainer.samples import normalise_text

# Each rule tested alone: the others set so they do nothing.
LOOSE = {
    "intent_max_ratio": 1.0,
    "intent_min_samples": 0,
    "problem_type_max_ratio": 1.0,
    "oversample_target_ratio": 0.001,
    "replay_min_share": 0.0,
    "replay_max_share": 1.0,
    "replay_target_share": 1.0,
    "heldout_ratio": 0.0,
}


def spec(n: int, **fields: Any) -> list[dict[str, Any]]:
    return [dict(fields) for _ in range(n)]


def seed_store(store: Store, specs: list[dict[str, Any]], start: int = 0) -> list[str]:
    """One interaction, failure, verdict and verified correction per spec; returns failure ids in order.

    spec keys: intent, problem_type, severity, tier, weight, user (prompt text), verified, original, correction."""
    ids = []
    with store.begin() as conn:
        for n, s in enumerate(specs, start=start):
            fid = f"f{n:05d}"
            user = s.get("user", f"question number {n} about {s.get('intent', 'billing')}")
            interaction = Interaction(
                id=f"i{n:05d}",
                timestamp="2026-01-01T00:00:00Z",
                model_version="v1",
                intent=s.get("intent", "billing"),
                messages=[
                    Message(role="system", content="You are a support agent."),
                    Message(role="user", content=user),
                    Message(role="assistant", content=s.get("original", f"bad answer {n}")),
                ],
                content_hash=f"h{n:05d}",
            )
            interaction_repo.insert_ignore(conn, [interaction_repo.to_row(interaction)])
            insert_failures(
                conn,
                [Failure(id=fid, interaction_id=interaction.id, rule="thumbs_down", first_seen_version="v1", intent=interaction.intent)],
            )
            save_verdict(
                conn,
                Verdict(
                    failure_id=fid,
                    is_failure=True,
                    problem_type=s.get("problem_type", "wrong_intent"),
                    severity=s.get("severity", "medium"),
                    judge="rule",
                ),
            )
            save_correction(
                conn,
                Correction(
                    failure_id=fid,
                    answer=s.get("correction", f"good answer {n}"),
                    generator="kb",
                    verification=Verification(passed=s.get("verified", True), verifier="rule"),
                ),
            )
            tier = s.get("tier", SampleTier.PROBLEM)
            if tier != SampleTier.PROBLEM or "weight" in s:
                move_tier(conn, fid, tier, actor="test", weight=s.get("weight"))
            ids.append(fid)
    return ids


@pytest.fixture
def make_ctx(project: Path) -> Iterator[Any]:
    opened: list[Context] = []

    def make(**dataset: Any) -> Context:
        extra = {k: dataset.pop(k) for k in ("eval",) if k in dataset}
        ctx = Context(settings=load_settings(project, dataset={**LOOSE, **dataset}, **extra))
        opened.append(ctx)
        return ctx

    yield make
    for ctx in opened:
        ctx.close()


def ids_of(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(r["sample_id"] for r in rows)


# --- the rules ----------------------------------------------------------------------------------------------


def test_bucket_cap_leaves_no_bucket_above_the_ratio() -> None:
    cap, used = bucket_cap({"a": 80, "b": 10, "c": 10}, 0.4)
    assert (cap, used) == (13, 0.4) and 13 <= 0.4 * (13 + 10 + 10) < 14
    assert bucket_cap({"a": 5, "b": 5}, 0.6) == (5, 0.6)  # already within: untouched
    assert bucket_cap({"a": 50, "b": 30}, 0.2) == (30, 0.5)  # 0.2 x 2 buckets < 1: equal buckets


def test_over_represented_failure_type_is_down_sampled_keeping_high_severity(make_ctx) -> None:
    ctx = make_ctx(problem_type_max_ratio=0.4)
    seed_store(
        ctx.store,
        spec(75, problem_type="format_error", severity="low")
        + spec(5, problem_type="format_error", severity="critical")
        + spec(10, problem_type="wrong_intent")
        + spec(10, problem_type="over_promise", severity="high"),
    )
    snap = build_snapshot(ctx, "sft")
    rows = read_rows(snap)
    types = Counter(r["problem_type"] for r in rows)
    assert types == {"format_error": 13, "wrong_intent": 10, "over_promise": 10}
    assert types["format_error"] / len(rows) <= 0.4
    assert sum(r["severity"] == "critical" for r in rows) == 5  # down-sampling drops low severity first
    step = next(s for s in snap.manifest["steps"] if s["step"] == "problem_type_cap")
    assert (step["problem_rows_before"], step["problem_rows_after"], step["cap"]) == (100, 33, 13)


def test_rare_high_risk_type_is_repeated_up_to_the_repeat_limit(make_ctx) -> None:
    ctx = make_ctx(oversample_target_ratio=0.2, max_repeats=3)
    high = seed_store(ctx.store, spec(3, problem_type="over_promise", severity="high"))
    low = seed_store(
        ctx.store, spec(2, problem_type="over_promise", severity="low") + spec(90, problem_type="format_error", severity="low"), start=100
    )
    rows = read_rows(build_snapshot(ctx, "sft"))
    copies = ids_of(rows)
    # target 0.2 x 95 = 19 rows: the three high-severity rows reach their limit of 3 copies, nothing else repeats
    assert [copies[i] for i in high] == [3, 3, 3]
    assert all(copies[i] == 1 for i in low)
    assert max(copies.values()) <= 3


def test_rare_type_stops_at_its_target(make_ctx) -> None:
    ctx = make_ctx(oversample_target_ratio=0.1, max_repeats=5)
    seed_store(
        ctx.store, spec(4, problem_type="policy_boundary_risk", severity="critical") + spec(96, problem_type="format_error", severity="low")
    )
    rows = read_rows(build_snapshot(ctx, "sft"))
    assert Counter(r["problem_type"] for r in rows)["policy_boundary_risk"] == 10  # floor(0.1 x 100)


def test_intent_floor_repeats_small_intents_and_cap_trims_big_ones(make_ctx) -> None:
    ctx = make_ctx(intent_max_ratio=0.25, intent_min_samples=30, max_repeats=2)
    specs = spec(300, intent="billing") + [s for name in ("cards", "refunds", "login", "shipping") for s in spec(100, intent=name)]
    small = seed_store(ctx.store, specs + spec(10, intent="rare_a"))
    floor_ids = small[-10:]
    seed_store(ctx.store, spec(20, intent="rare_b"), start=1000)
    snap = build_snapshot(ctx, "sft")
    rows = read_rows(snap)
    intents = Counter(r["intent"] for r in rows)
    assert max(intents.values()) / len(rows) <= 0.25
    assert intents["billing"] < 300
    assert intents["rare_a"] == 20  # 10 rows x max_repeats 2: as close to 30 as the limit allows
    assert intents["rare_b"] == 30  # 20 rows, 10 of them twice
    copies = ids_of(rows)
    assert all(copies[i] == 2 for i in floor_ids) and max(copies.values()) <= 2
    assert any("rare_a (20)" in w for w in snap.manifest["warnings"])
    assert snap.manifest["checks"]["intent_max_share"]["held"]


def test_loss_weight_is_category_times_tier_times_failure_weight(make_ctx) -> None:
    ctx = make_ctx(
        replay_target_share=0.5,
        loss_weights={"safety": 3.0, "reasoning": 1.5, "format": 0.5},
        tier_weights={"core_baseline": 4.0, "secondary_baseline": 2.0, "candidate_baseline": 1.0},
    )
    seed_store(
        ctx.store,
        [
            {"problem_type": "over_promise"},
            {"problem_type": "format_error", "weight": 2.0},
            {"problem_type": "wrong_tool_call", "tier": SampleTier.CORE},
            {"problem_type": "format_error", "tier": SampleTier.SECONDARY, "weight": 0.5},
        ],
    )
    by_id = {r["failure_id"]: r for r in read_rows(build_snapshot(ctx, "sft"))}
    assert by_id["f00000"]["weight"] == pytest.approx(3.0) and by_id["f00000"]["category"] == "safety"
    assert by_id["f00001"]["weight"] == pytest.approx(0.5 * 2.0)
    assert by_id["f00002"]["weight"] == pytest.approx(1.5 * 4.0) and by_id["f00002"]["tier"] == "core_baseline"
    assert by_id["f00003"]["weight"] == pytest.approx(0.5 * 2.0 * 0.5)


def test_replay_share_stays_within_bounds_and_core_is_drawn_most(make_ctx) -> None:
    ctx = make_ctx(replay_min_share=0.1, replay_max_share=0.3, replay_target_share=None)
    seed_store(
        ctx.store, spec(40) + spec(300, tier=SampleTier.CORE) + spec(300, tier=SampleTier.SECONDARY) + spec(300, tier=SampleTier.CANDIDATE)
    )
    snap = build_snapshot(ctx, "sft")
    rows = read_rows(snap)
    share = sum(r["tier"] == "problem" for r in rows) / len(rows)
    assert 0.1 <= share <= 0.3 and share == pytest.approx(0.2, abs=0.01)  # the middle of the range
    assert sum(r["tier"] == "problem" for r in rows) == 40  # every new fix is in
    tiers = Counter(r["tier"] for r in rows)
    assert tiers["core_baseline"] > tiers["secondary_baseline"] > tiers["candidate_baseline"] > 0
    assert snap.manifest["checks"]["problem_share"]["held"]


def test_too_little_replay_keeps_every_problem_and_warns(make_ctx) -> None:
    ctx = make_ctx(replay_min_share=0.05, replay_max_share=0.2, replay_target_share=None)
    problems = seed_store(ctx.store, spec(50) + spec(5, tier=SampleTier.CORE))[:50]
    snap = build_snapshot(ctx, "sft")
    rows = read_rows(snap)
    assert set(problems) <= {r["failure_id"] for r in rows} and len(rows) == 55
    assert any("above replay_max_share" in w and "all problem rows were kept" in w for w in snap.manifest["warnings"])
    assert not snap.manifest["checks"]["problem_share"]["held"]


def test_extra_rows_supply_replay_when_there_is_no_baseline(make_ctx) -> None:
    ctx = make_ctx(replay_min_share=0.1, replay_max_share=0.3, replay_target_share=None)
    seed_store(ctx.store, spec(30))
    stable = [
        {
            "messages": [{"role": "user", "content": f"stable question {i}"}, {"role": "assistant", "content": f"fine answer {i}"}],
            "tier": "core_baseline",
            "intent": "billing",
        }
        for i in range(200)
    ]
    bad = {"messages": [{"role": "user", "content": "no answer"}], "tier": "core_baseline"}
    snap = build_snapshot(ctx, "sft", extra_rows=[*stable, bad])
    rows = read_rows(snap)
    extra = [r for r in rows if r["source"] == "extra"]
    assert extra and all(r["failure_id"] is None and r["tier"] == "core_baseline" and r["problem_type"] == "none" for r in extra)
    assert 0.1 <= 30 / len(rows) <= 0.3
    assert snap.manifest["sources"]["extra_rejected"] == [
        "extra_rows[200]: messages: List should have at least 2 items after validation, not 1"
    ]


def test_heldout_never_overlaps_the_test_set_and_keeps_prompts_on_one_side(make_ctx, project: Path) -> None:
    test_set = project / "test.jsonl"
    test_set.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": text}], "reference": {"intent": "billing"}}) + "\n"
            for text in ["Question number 3 about BILLING!", "question   number 7 about billing", "something else entirely"]
        )
    )
    ctx = make_ctx(heldout_ratio=0.2, eval={"test_set": "test.jsonl"})
    specs = [{"intent": ("billing" if n % 2 else "cards")} for n in range(100)]
    specs[7]["intent"] = "billing"
    specs += [{"intent": "cards", "user": "same prompt twice"} for _ in range(2)]
    seed_store(ctx.store, specs)
    snap = build_snapshot(ctx, "sft")
    train, heldout = read_rows(snap, "train"), read_rows(snap, "heldout")
    test_keys = {normalise_text(t) for t in ["Question number 3 about BILLING!", "question number 7 about billing"]}
    for row in train + heldout:
        assert normalise_text(row["messages"][1]["content"]) not in test_keys
    step = snap.manifest["steps"][0]
    assert step["step"] == "test_set_filter" and step["dropped"] == 2
    assert snap.manifest["test_set"]["items"] == 3
    # stratified: 20% of each intent's prompts, whole prompt groups on one side
    assert Counter(r["intent"] for r in heldout) == {"billing": 10, "cards": 10}
    train_prompts = {r["messages"][1]["content"] for r in train}
    assert not train_prompts & {r["messages"][1]["content"] for r in heldout}
    assert set(ids_of(train)).isdisjoint(ids_of(heldout))


def test_defaults_hold_every_rule_together(project: Path) -> None:
    """Default settings on a skewed store: every rule has something to do, and all hold at the end."""
    ctx = Context(settings=load_settings(project))
    # tier weights alone decide the replay draw here (counter replay shares it per intent first:
    # test_counter_replay_protects_the_intents_problem_rows_correct_away_from)
    ctx.settings.dataset.replay_strategy = "weighted"
    try:
        intents = ["billing"] * 60 + ["cards"] * 30 + ["refunds"] * 30 + ["login"] * 10 + ["travel"] * 20
        types = ["format_error"] * 90 + ["wrong_intent"] * 40 + ["over_promise"] * 14 + ["policy_boundary_risk"] * 6
        specs = [
            {"intent": i, "problem_type": t, "severity": "critical" if t == "policy_boundary_risk" else "medium"}
            for i, t in zip(intents, types)
        ]
        tiers = [SampleTier.CORE, SampleTier.SECONDARY, SampleTier.CANDIDATE]
        replay_intents = ["billing"] * 300 + ["cards", "refunds", "login", "shipping"] * 150
        specs += [{"intent": i, "problem_type": "wrong_intent", "tier": tiers[n % 3]} for n, i in enumerate(replay_intents)]
        seed_store(ctx.store, specs)
        snap = build_snapshot(ctx, "sft")
        rows = read_rows(snap)
        steps = {s["step"]: s for s in snap.manifest["steps"]}
        assert steps["problem_type_cap"]["problem_rows_after"] < 150 and steps["oversample_high_risk"]["added_by_type"]
        assert steps["intent_floor"]["added_by_intent"] and steps["intent_cap"]["after"] < steps["intent_cap"]["before"]
        assert all(check["held"] for check in snap.manifest["checks"].values()), snap.manifest["checks"]
        s = ctx.settings.dataset
        intents_seen = Counter(r["intent"] for r in rows)
        assert max(intents_seen.values()) / len(rows) <= s.intent_max_ratio
        assert min(intents_seen.values()) >= s.intent_min_samples
        problems = [r for r in rows if r["tier"] == "problem"]
        assert s.replay_min_share <= len(problems) / len(rows) <= s.replay_max_share
        assert max(Counter(r["problem_type"] for r in problems).values()) / len(problems) <= s.problem_type_max_ratio
        assert max(ids_of(rows).values()) <= s.max_repeats
        tiers_seen = Counter(r["tier"] for r in rows)
        assert tiers_seen["core_baseline"] >= tiers_seen["secondary_baseline"] >= tiers_seen["candidate_baseline"]
    finally:
        ctx.close()


# --- snapshots ----------------------------------------------------------------------------------------------


def test_manifest_composition_matches_the_rows(make_ctx) -> None:
    ctx = make_ctx(heldout_ratio=0.25, replay_target_share=None, replay_min_share=0.2, replay_max_share=0.6)
    seed_store(
        ctx.store,
        [{"intent": ["a", "b", "c"][n % 3], "problem_type": ["over_promise", "format_error"][n % 2]} for n in range(60)]
        + [{"intent": "a", "tier": SampleTier.CORE} for _ in range(80)],
    )
    snap = build_snapshot(ctx, "sft")
    for split in ("train", "heldout"):
        rows = read_rows(snap, split)
        comp = snap.manifest["composition"][split]
        assert comp["rows"] == len(rows) == snap.manifest["files"][split]["rows"]
        assert comp["by_intent"] == dict(Counter(r["intent"] for r in rows))
        assert comp["by_problem_type"] == dict(Counter(r["problem_type"] for r in rows))
        assert comp["by_tier"] == dict(Counter(r["tier"] for r in rows))
        assert comp["unique"] == len(ids_of(rows))
    steps = snap.manifest["steps"]
    for before, after in zip(steps, steps[1:]):
        assert after["before"] == before["after"]  # the training rows flow from one step to the next
    assert [s["step"] for s in steps] == [
        "test_set_filter",
        "problem_type_cap",
        "oversample_high_risk",
        "replay_mix",
        "heldout_split",
        "intent_floor",
        "intent_cap",
    ]


def test_same_state_gives_the_same_snapshot_and_other_config_another(make_ctx) -> None:
    ctx = make_ctx(heldout_ratio=0.2)
    seed_store(ctx.store, spec(30, intent="billing") + spec(30, intent="cards"))
    first = build_snapshot(ctx, "sft")
    train_bytes = first.file("train").read_bytes()
    again = build_snapshot(make_ctx(heldout_ratio=0.2), "sft")
    assert (again.id, again.content_hash, again.path) == (first.id, first.content_hash, first.path)
    assert again.file("train").read_bytes() == train_bytes
    other = build_snapshot(make_ctx(heldout_ratio=0.2, seed=1), "sft")
    assert other.id != first.id and other.path != first.path
    assert first.file("train").read_bytes() == train_bytes  # never overwritten
    assert {s.id for s in list_snapshots(ctx.store)} == {first.id, other.id}
    # a new verified failure is a new state
    seed_store(ctx.store, spec(1, intent="cards"), start=500)
    assert build_snapshot(ctx, "sft").content_hash != first.content_hash


def test_dpo_rows_pair_correction_with_the_original_answer(make_ctx) -> None:
    ctx = make_ctx()
    seed_store(
        ctx.store,
        [{"original": "We guarantee a refund.", "correction": "I can open a refund review."}, {"original": "same", "correction": "same"}],
    )
    snap = build_snapshot(ctx, "dpo")
    rows = read_rows(snap)
    assert len(rows) == 1 and snap.kind == "dpo" and snap.id.startswith("ds-dpo-")
    row = rows[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": "I can open a refund review."}]
    assert row["rejected"] == [{"role": "assistant", "content": "We guarantee a refund."}]
    assert "messages" not in row and row["weight"] > 0
    assert any("no distinct rejected answer" in w for w in snap.manifest["warnings"])


def test_sft_row_is_prompt_plus_correction(make_ctx) -> None:
    ctx = make_ctx()
    seed_store(
        ctx.store,
        [{"user": "Where is my card?", "correction": "It ships in 3 days.", "intent": "cards", "problem_type": "missing_knowledge"}],
    )
    row = read_rows(build_snapshot(ctx, "sft"))[0]
    assert row["messages"] == [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Where is my card?"},
        {"role": "assistant", "content": "It ships in 3 days."},
    ]
    assert (row["intent"], row["problem_type"], row["category"], row["tier"], row["failure_id"]) == (
        "cards",
        "missing_knowledge",
        "reasoning",
        "problem",
        "f00000",
    )


def test_a_human_label_sets_the_intent_and_newest_verified_correction_wins(make_ctx) -> None:
    from flywheel.data.labels import add_label

    ctx = make_ctx()
    (fid,) = seed_store(ctx.store, [{"intent": "billing", "correction": "first fix"}])
    with ctx.store.begin() as conn:
        save_correction(
            conn, Correction(failure_id=fid, answer="second fix", generator="kb", verification=Verification(passed=True, verifier="rule"))
        )
        save_correction(
            conn, Correction(failure_id=fid, answer="failed fix", generator="kb", verification=Verification(passed=False, verifier="rule"))
        )
        move_tier(conn, fid, SampleTier.CORE, actor="test")  # a graduated sample trains whatever its status
    add_label(ctx.store, fid, {"intent": "refunds"}, "alice")
    # the failure is now replay; a supplied problem row lets the snapshot build
    new_problem = {"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "fix"}], "tier": "problem"}
    rows = read_rows(build_snapshot(make_ctx(replay_target_share=0.5), "sft", extra_rows=[new_problem]))
    (row,) = [r for r in rows if r["failure_id"] == fid]
    assert row["intent"] == "refunds" and row["messages"][-1]["content"] == "second fix"


def test_unverified_corrections_are_not_trained_on(make_ctx) -> None:
    ctx = make_ctx()
    seed_store(ctx.store, [{"verified": False}])
    with pytest.raises(UserInputError, match="no verified problem rows"):
        build_snapshot(ctx, "sft")


def test_parquet_snapshot_reads_back_like_jsonl(make_ctx) -> None:
    pytest.importorskip("pyarrow")
    seed_store(make_ctx().store, spec(12, intent="billing"))
    as_jsonl = build_snapshot(make_ctx(), "sft")
    as_parquet = build_snapshot(make_ctx(format="parquet"), "sft")
    assert as_parquet.file("train").suffix == ".parquet" and as_parquet.id != as_jsonl.id
    assert as_parquet.content_hash == as_jsonl.content_hash
    assert read_rows(as_parquet) == read_rows(as_jsonl)


def test_snapshot_is_recorded_in_the_store(any_store: Store) -> None:
    ctx = Context(settings=any_store.settings, _store=any_store)
    seed_store(any_store, spec(8, intent="billing") + spec(4, tier=SampleTier.CORE))
    snap = build_snapshot(ctx, "sft")
    stored = get_snapshot(any_store, snap.id)
    assert stored.content_hash == snap.content_hash and stored.manifest == snap.manifest and stored.created_at is not None
    assert build_snapshot(ctx, "sft").id == snap.id
    assert [s.id for s in list_snapshots(any_store)] == [snap.id]


# --- the commands -------------------------------------------------------------------------------------------


def test_dataset_commands(make_ctx, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "flywheel.toml").write_text(
        "[dataset]\nheldout_ratio = 0.0\nintent_min_samples = 0\nreplay_min_share = 0.0\nreplay_max_share = 1.0\nreplay_target_share = 0.5\n"
    )
    seed_store(make_ctx().store, spec(6, intent="billing"))
    assert main(["-C", str(project), "dataset", "build", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert main(["-C", str(project), "dataset", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["id"] for s in listed] == [built["id"]] and listed[0]["train_rows"] == 6
    assert main(["-C", str(project), "dataset", "show", built["id"]]) == 0
    assert "problem_type_cap" in capsys.readouterr().out
    assert main(["-C", str(project), "dataset", "show", "ds-nope"]) == 3
    assert main(["-C", str(project), "dataset", "build", "--kind", "rlhf"]) == 2
    replay = project / "replay.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "tier": "core_baseline"}
    replay.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "tier": "gold"}) + "\n")
    assert main(["-C", str(project), "dataset", "build", "--replay", str(replay), "--json"]) == 2
    captured = capsys.readouterr()
    assert f"{replay}:2: not valid JSON" in captured.err and f"{replay}:3: tier" in captured.err
    snap = json.loads(captured.out)
    assert snap["manifest"]["sources"]["extra"] == {"core_baseline": 1}


def test_counter_replay_protects_the_intents_problem_rows_correct_away_from(project: Path) -> None:
    """Problem rows that correct answers of intent "billing" to other intents: counter replay gives
    billing the most replay rows, every other served intent still gets some, and the draw is the
    same for the same store."""
    ctx = Context(settings=load_settings(project))
    try:
        ds = ctx.settings.dataset
        ds.intent_min_samples, ds.intent_max_ratio, ds.heldout_ratio = 0, 1.0, 0.0
        ds.replay_min_share = ds.replay_max_share = 0.5  # as many replay rows as problem rows
        said = lambda intent: json.dumps({"intent": intent, "reply": "..."})  # noqa: E731 - a tiny table of answers
        specs = [{"intent": i, "original": said("billing")} for i in ["cards"] * 20 + ["refunds"] * 10]  # 30 rows away from billing
        replay_intents = ["billing"] * 40 + ["cards"] * 40 + ["refunds"] * 40 + ["login"] * 40
        specs += [{"intent": i, "tier": SampleTier.CANDIDATE} for i in replay_intents]
        seed_store(ctx.store, specs)
        snap = build_snapshot(ctx, "sft")
        replay = Counter(r["intent"] for r in read_rows(snap) if r["tier"] != "problem")
        assert sum(replay.values()) == 30
        # weights: billing 1 + 30, the others 1 each -> billing takes 27 of 30, each other intent one
        assert replay["billing"] == 27 and replay["cards"] == replay["refunds"] == replay["login"] == 1
        mix = next(s for s in snap.manifest["steps"] if s["step"] == "replay_mix")
        assert mix["strategy"] == "counter" and mix["replay_drawn_by_intent"] == dict(sorted(replay.items()))
        assert build_snapshot(ctx, "sft").id == snap.id
    finally:
        ctx.close()


def _sample(key: str, intent: str, text: str, tier: str) -> Any:
    from flywheel.trainer.balance import Sample

    return Sample(
        key=key,
        tier=tier,
        intent=intent,
        problem_type="wrong_intent" if tier == "problem" else "none",
        severity=None,
        category="reasoning",
        base_weight=1.0,
        prompt=[{"role": "user", "content": text}],
        answer="{}",
        rejected=None,
        group=normalise_text(text),
        last_user=normalise_text(text),
    )


def test_boundary_replay_draws_the_neighbours_of_each_correction_first() -> None:
    """Corrections to "request_refund" sit next to requests that really are "refund_not_showing_up":
    boundary replay draws those neighbours (by the real embedding model), where per-intent replay
    shares the same budget out evenly."""
    from flywheel.store.vectors import Embedder
    from flywheel.trainer.balance import Ledger
    from flywheel.trainer.replay_mix import boundary_neighbours, mix_replay

    problems = [
        _sample(f"p{i}", "request_refund", text, "problem")
        for i, text in enumerate(
            ["I want my money back for this order", "Please refund the item I returned", "Can I get a refund for the purchase?"]
        )
    ]
    near = ["My refund still hasn't shown up in my account", "The refund for my order is not showing", "Where is the refund you sent me?"]
    far = [
        "When will my new card arrive?",
        "How do I change my PIN?",
        "My card was delivered to the wrong address",
        "Is there a fee for top ups?",
    ]
    replay = [_sample(f"n{i}", "refund_not_showing_up", t, "candidate_baseline") for i, t in enumerate(near)]
    replay += [_sample(f"f{i}", "card_questions", t, "candidate_baseline") for i, t in enumerate(far * 2)]
    embedder = Embedder()
    named = boundary_neighbours(problems, replay, embedder.embed, k=2)
    assert named and all(replay[i].intent == "refund_not_showing_up" for i in named)
    assert sum(named.values()) == 2 * len(problems)

    rows = [*problems, *replay]
    boundary = mix_replay(rows, 0.5, 0.5, None, {"candidate_baseline": 1.0}, 0, Ledger(), "boundary", embedder.embed, 2)
    counter = mix_replay(rows, 0.5, 0.5, None, {"candidate_baseline": 1.0}, 0, Ledger(), "counter")
    drawn = lambda mixed: Counter(s.intent for s in mixed if s.tier != "problem")  # noqa: E731
    assert sum(drawn(boundary).values()) == sum(drawn(counter).values()) == 3
    assert drawn(boundary)["refund_not_showing_up"] > drawn(counter)["refund_not_showing_up"]
    assert {s.key for s in boundary if s.tier != "problem"} >= {replay[i].key for i in named}
    with pytest.raises(ValueError, match="embedding function"):
        mix_replay(rows, 0.5, 0.5, None, {"candidate_baseline": 1.0}, 0, Ledger(), "boundary")


def test_the_problem_type_cap_trims_unlabelled_rows_and_keeps_every_label() -> None:
    """After a cycle fixed over_promise, the next one sees few of it: an equal-share cap would cut the
    wrong_intent rows to match, labels included. It trims only the rows that came without a label."""
    from dataclasses import replace

    from flywheel.trainer.balance import Ledger, cap_problem_types

    def row(key: str, problem_type: str, origin: str) -> Any:
        return replace(_sample(key, "card_arrival", f"text {key}", "problem"), problem_type=problem_type, origin=origin)

    rows = [row(f"p{i}", "over_promise", "kb_correction") for i in range(5)]
    rows += [row(f"l{i}", "wrong_intent", "label") for i in range(30)]
    rows += [row(f"c{i}", "wrong_intent", "kb_correction") for i in range(20)]
    kept = cap_problem_types(rows, 0.5, seed=0, ledger=Ledger())
    by_key = {r.key for r in kept}
    assert all(f"l{i}" in by_key for i in range(30))  # every label stays, though 30 > the cap of 5
    assert not any(f"c{i}" in by_key for i in range(20))  # the unlabelled rows of the type over the cap go
    assert all(f"p{i}" in by_key for i in range(5))
    # under the cap of a balanced pool, labels and the rest are trimmed as before: labels first
    rows = [row(f"p{i}", "over_promise", "kb_correction") for i in range(40)] + rows[5:]
    kept = cap_problem_types(rows, 0.5, seed=0, ledger=Ledger())
    wrong = [r for r in kept if r.problem_type == "wrong_intent"]
    assert len(wrong) == 40 and sum(r.origin == "label" for r in wrong) == 30
