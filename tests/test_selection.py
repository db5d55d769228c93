"""Active learning: each strategy picks what it should on small constructed data; rounds stop as told."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flywheel.cli import main
from flywheel.context import Context
from flywheel.data.labels import add_label
from flywheel.errors import UserInputError
from flywheel.records import Failure, Interaction, Message
from flywheel.settings import load_settings
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.failures import insert_failures
from flywheel.trainer.selection import STRATEGIES, Candidates, kcenter_greedy, run_rounds, select


def clusters(sizes: list[int], dim: int = 8, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points around far-apart centres: (points, cluster label of each, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim)) * 10
    labels = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[labels] + rng.standard_normal((len(labels), dim)) * spread
    return points.astype(np.float32), labels, centres


def make(n: int, **features: np.ndarray) -> Candidates:
    emb = np.random.default_rng(1).standard_normal((n, 4)).astype(np.float32)
    return Candidates(ids=[f"c{i}" for i in range(n)], embeddings=emb, **features)


# --- uncertainty ---------------------------------------------------------------------------------------------


def test_least_confidence_picks_the_least_confident() -> None:
    top1 = np.array([0.9, 0.2, 0.6, 0.35, 0.99, 0.5])
    assert select(make(6, top1=top1), "least_confidence", 3) == ["c1", "c3", "c5"]
    # mean token log-probability stands in for top1 when that is all the log has
    assert select(make(6, mean_logprob=np.log(top1)), "least_confidence", 2) == ["c1", "c3"]


def test_margin_picks_the_closest_top_two() -> None:
    top1 = np.array([0.50, 0.45, 0.90, 0.60])
    top2 = np.array([0.10, 0.44, 0.05, 0.35])
    assert select(make(4, top1=top1, top2=top2), "margin", 2) == ["c1", "c3"]


def test_entropy_picks_the_flattest_distribution() -> None:
    entropy = np.array([0.1, 2.3, 0.7, 1.9])
    assert select(make(4, entropy=entropy), "entropy", 2) == ["c1", "c3"]
    # without logged entropy: a lower bound from top1/top2, which orders flat before peaked
    top1, top2 = np.array([0.95, 0.4, 0.7]), np.array([0.03, 0.35, 0.2])
    assert select(make(3, top1=top1, top2=top2), "entropy", 3) == ["c1", "c2", "c0"]


def test_expected_change_weighs_doubt_by_gradient_magnitude() -> None:
    top1 = np.array([0.5, 0.9, 0.99])
    hidden = np.array([1.0, 10.0, 10.0])  # (1 - p) x ||h||: 0.5, 1.0, 0.1
    assert select(make(3, top1=top1, hidden_norm=hidden), "expected_change", 3) == ["c1", "c0", "c2"]
    # with top2: sqrt((1 - p1)^2 + p2^2) x ||h||
    c = make(2, top1=np.array([0.6, 0.6]), top2=np.array([0.0, 0.4]), hidden_norm=np.array([1.0, 1.0]))
    assert select(c, "expected_change", 1) == ["c1"]


def test_uncertainty_needs_its_features() -> None:
    c = make(3, top1=np.array([0.2, 0.3, 0.4]))
    with pytest.raises(UserInputError, match="margin needs top1 and top2"):
        select(c, "margin", 1)
    with pytest.raises(UserInputError, match="token probabilities"):
        select(make(3), "least_confidence", 1)
    with pytest.raises(UserInputError, match="unknown selection strategy"):
        select(c, "most_fun", 1)
    with pytest.raises(UserInputError, match="embeddings must have shape"):
        Candidates(ids=["a", "b"], embeddings=np.zeros((3, 2)))
    with pytest.raises(UserInputError, match="top1 must be probabilities"):
        make(2, top1=np.array([0.5, 1.5]))
    with pytest.raises(UserInputError, match="NaN"):
        make(2, entropy=np.array([0.5, np.nan]))


# --- diversity -----------------------------------------------------------------------------------------------


def test_kcenter_covers_far_apart_clusters_better_than_random() -> None:
    points, labels, _ = clusters([1000] + [5] * 9)
    c = Candidates(ids=[str(i) for i in range(len(points))], embeddings=points)
    covered = {name: len({labels[int(i)] for i in select(c, name, 10, seed=3)}) for name in ("kcenter", "random")}
    assert covered["kcenter"] == 10
    assert covered["random"] < 5  # 1000 of 1045 points sit in one cluster


def test_kcenter_treats_labelled_points_as_covered() -> None:
    points, labels, _ = clusters([20] * 4)
    c = Candidates(ids=[str(i) for i in range(len(points))], embeddings=points)
    labelled = ["0", "20", "40"]  # one in each of the first three clusters
    picked = select(c, "kcenter", 1, already_selected=labelled)
    assert labels[int(picked[0])] == 3 and picked[0] not in labelled


def test_kcenter_on_a_random_projection_still_covers_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    import flywheel.trainer.selection as selection

    monkeypatch.setattr(selection, "PROJECT_ABOVE", 0)  # force the projection path
    monkeypatch.setattr(selection, "PROJECT_DIMS", 16)
    points, labels, _ = clusters([300] + [4] * 7, dim=64)
    allowed = np.ones(len(points), dtype=bool)
    picks = kcenter_greedy(points, 8, allowed, np.zeros(0, dtype=np.int64), seed=0)
    assert len({labels[i] for i in picks}) == 8


def test_kmeans_picks_one_central_point_per_cluster() -> None:
    points, labels, centres = clusters([40] * 5, spread=0.5)
    c = Candidates(ids=[str(i) for i in range(len(points))], embeddings=points)
    picked = [int(i) for i in select(c, "kmeans", 5, seed=0)]
    assert sorted(labels[picked]) == [0, 1, 2, 3, 4]
    for i in picked:  # the pick is among the most central of its cluster
        members = np.flatnonzero(labels == labels[i])
        mean = points[members].mean(axis=0)
        dists = np.linalg.norm(points[members] - mean, axis=1)
        assert np.linalg.norm(points[i] - mean) <= np.quantile(dists, 0.2)


def test_random_is_seeded_unique_and_skips_the_selected() -> None:
    c = make(50)
    first = select(c, "random", 10, seed=7, already_selected=["c0", "c1"])
    assert first == select(c, "random", 10, seed=7, already_selected=["c0", "c1"])
    assert len(set(first)) == 10 and not {"c0", "c1"} & set(first)
    assert first != select(c, "random", 10, seed=8, already_selected=["c0", "c1"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_k_new_unique_ids(strategy: str) -> None:
    rng = np.random.default_rng(0)
    top1 = rng.uniform(0.3, 1.0, 200)
    c = Candidates(
        ids=[f"c{i}" for i in range(200)],
        embeddings=rng.standard_normal((200, 16)).astype(np.float32),
        top1=top1,
        top2=rng.uniform(0, 1, 200) * (1 - top1),
        entropy=rng.uniform(0, 3, 200),
    )
    done = [f"c{i}" for i in range(0, 200, 10)]
    picked = select(c, strategy, 25, round_index=2, already_selected=done)
    assert len(picked) == len(set(picked)) == 25 and not set(picked) & set(done)
    assert select(c, strategy, 500, already_selected=done, round_index=2).__len__() == 180  # all that is left


# --- hybrid and rounds ---------------------------------------------------------------------------------------


def hybrid_pool() -> tuple[Candidates, set[str]]:
    """A tight clump of 60 uncertain points and 200 confident ones spread far apart."""
    rng = np.random.default_rng(0)
    clump = rng.standard_normal((60, 8)) * 0.01
    spread = rng.standard_normal((200, 8)) * 10
    emb = np.vstack([clump, spread]).astype(np.float32)
    top1 = np.concatenate([rng.uniform(0.2, 0.3, 60), rng.uniform(0.9, 1.0, 200)])
    ids = [f"u{i}" for i in range(60)] + [f"s{i}" for i in range(200)]
    return Candidates(ids=ids, embeddings=emb, top1=top1), set(ids[:60])


def test_hybrid_moves_from_diversity_to_uncertainty_across_rounds() -> None:
    pool, unsure = hybrid_pool()
    labelled: list[list[str]] = []
    log = run_rounds(
        pool, "hybrid", budget=40, round_size=8, label_fn=labelled.append, gain_fn=lambda ids, so_far: 1.0, min_gain=0.0, hybrid_step=0.25
    )
    per_round = [sum(i in unsure for i in r.ids) for r in log.rounds]
    assert [r.uncertainty_share for r in log.rounds] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert per_round[0] <= 1  # round 0: diversity, the clump is one point of space
    assert per_round == sorted(per_round) and per_round[-1] == 8
    assert labelled == [r.ids for r in log.rounds]


def test_rounds_stop_when_the_budget_is_spent() -> None:
    pool, _ = hybrid_pool()
    log = run_rounds(
        pool, "least_confidence", budget=25, round_size=10, label_fn=lambda ids: None, gain_fn=lambda ids, so_far: 0.5, min_gain=0.01
    )
    assert [len(r.ids) for r in log.rounds] == [10, 10, 5]
    assert log.spent == 25 == len(set(log.selected)) and log.stop_reason == "budget"


def test_rounds_stop_when_a_round_gains_too_little() -> None:
    pool, _ = hybrid_pool()
    gains = iter([0.05, 0.01, 0.001, 0.2])
    log = run_rounds(
        pool, "random", budget=100, round_size=5, label_fn=lambda ids: None, gain_fn=lambda ids, so_far: next(gains), min_gain=0.002
    )
    assert [r.gain for r in log.rounds] == [0.05, 0.01, 0.001]
    assert log.stop_reason == "min_gain" and log.spent == 15


def test_rounds_stop_when_candidates_run_out_and_refresh_feeds_new_ones() -> None:
    c = make(7, top1=np.linspace(0.1, 0.9, 7))
    seen: list[int] = []

    def refresh(selected: list[str]) -> Candidates:
        seen.append(len(selected))
        return make(7, top1=np.linspace(0.9, 0.1, 7))  # the retrained model is now unsure of the others

    log = run_rounds(
        c,
        "least_confidence",
        budget=20,
        round_size=3,
        label_fn=lambda ids: None,
        gain_fn=lambda ids, so_far: 1.0,
        min_gain=0.0,
        refresh=refresh,
    )
    assert log.rounds[0].ids == ["c0", "c1", "c2"] and log.rounds[1].ids == ["c6", "c5", "c4"]
    assert log.spent == 7 and log.stop_reason == "exhausted" and seen == [3, 6, 7]


# --- the command ---------------------------------------------------------------------------------------------


def seed_captured(store: Store, texts: list[str]) -> list[str]:
    ids = []
    with store.begin() as conn:
        for n, text in enumerate(texts):
            interaction = Interaction(
                id=f"i{n}",
                timestamp="2026-01-01T00:00:00Z",
                intent="billing",
                content_hash=f"h{n}",
                messages=[Message(role="user", content=text), Message(role="assistant", content="hm")],
            )
            interaction_repo.insert_ignore(conn, [interaction_repo.to_row(interaction)])
            insert_failures(
                conn, [Failure(id=f"f{n}", interaction_id=interaction.id, rule="thumbs_down", first_seen_version="v1", risk=float(n))]
            )
            ids.append(f"f{n}")
    return ids


TEXTS = [
    "my card was charged twice",
    "double charge on my card",
    "card charged two times",
    "how do I reset my password",
    "password reset link does not work",
    "where is my parcel",
    "the delivery is late",
]


def test_select_command_from_a_candidates_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = project / "candidates.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "embedding": [i, 0.0], "top1": p}) + "\n" for i, p in enumerate([0.9, 0.1, 0.5])))
    assert main(["-C", str(project), "select", "--strategy", "least_confidence", "--budget", "2", "--candidates", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in out["selected"]] == ["x1", "x2"]
    assert main(["-C", str(project), "select", "--strategy", "margin", "--candidates", str(path)]) == 2
    assert "margin needs top1 and top2" in capsys.readouterr().err


def test_select_command_picks_diverse_unlabelled_failures_within_the_budget(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "flywheel.toml").write_text("[selection]\nlabelling_budget = 4\n")
    ctx = Context(settings=load_settings(project))
    try:
        ids = seed_captured(ctx.store, TEXTS)
        add_label(ctx.store, ids[0], {"intent": "billing"}, "alice")
    finally:
        ctx.close()
    assert main(["-C", str(project), "select", "--strategy", "kcenter", "--budget", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    picked = [r["id"] for r in out["selected"]]
    assert len(picked) == 3 and ids[0] not in picked and out["budget_left_after"] == 0
    # the card-charge topic is covered by the labelled f0: the three picks spread over the other topics
    topics = {"f1": "card", "f2": "card", "f3": "password", "f4": "password", "f5": "parcel", "f6": "parcel"}
    assert len({topics[i] for i in picked}) >= 2 and sum(topics[i] == "card" for i in picked) <= 1
    assert main(["-C", str(project), "select", "--strategy", "kcenter", "--budget", "5"]) == 2
    assert "exceeds the labelling budget left (3 of 4)" in capsys.readouterr().err


def test_select_command_ranks_by_the_production_model(
    project: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from flywheel.demo.tiny_model import build_tiny_model, tiny_corpus
    from flywheel.inference.local_model import LocalModel
    from flywheel.trainer.candidates import model_features

    base = build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", tiny_corpus(), vocab_size=300, hidden=32, layers=1, heads=2)
    ctx = Context(settings=load_settings(project))
    try:
        seed_captured(ctx.store, TEXTS)
    finally:
        ctx.close()
    assert main(["-C", str(project), "select", "--strategy", "least_confidence", "--budget", "3", "--model", str(base), "--json"]) == 0
    picked = [r["id"] for r in json.loads(capsys.readouterr().out)["selected"]]
    features = model_features(LocalModel(base), [[{"role": "user", "content": t}] for t in TEXTS])
    expected = [f"f{i}" for i in np.argsort(features["top1"], kind="stable")[:3]]
    assert picked == expected


def test_kmeans_keeps_a_pick_in_each_rare_cluster() -> None:
    # one common intent and seven rare ones: no centre of a rare cluster may be moved into the common one
    for seed in range(3):
        points, labels, _ = clusters([3000] + [20] * 7, seed=seed)
        c = Candidates(ids=[str(i) for i in range(len(points))], embeddings=points)
        assert sorted({int(labels[int(i)]) for i in select(c, "kmeans", 8, seed=seed)}) == list(range(8))


def test_kmeans_and_projected_kcenter_repeat_for_a_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    import flywheel.trainer.selection as selection

    rng = np.random.default_rng(4)
    c = Candidates(ids=[f"c{i}" for i in range(600)], embeddings=rng.standard_normal((600, 48)).astype(np.float32))
    first = select(c, "kmeans", 30, seed=2)
    assert first == select(c, "kmeans", 30, seed=2) and len(set(first)) == 30
    assert first != select(c, "kmeans", 30, seed=3)
    monkeypatch.setattr(selection, "PROJECT_ABOVE", 0)  # force the projection path
    monkeypatch.setattr(selection, "PROJECT_DIMS", 16)
    projected = select(c, "kcenter", 30, seed=2)
    assert projected == select(c, "kcenter", 30, seed=2) and len(set(projected)) == 30
    assert projected != select(c, "kcenter", 30, seed=3)
