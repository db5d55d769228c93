"""AutoSFT (`flywheel train --auto`, flywheel.trainer.auto): the profile of constructed snapshots, the
documented choices it leads to, and the command that prints both and then trains with them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flywheel.cli import main
from flywheel.errors import UserInputError
from flywheel.settings_sections import TrainSettings
from flywheel.trainer import auto


def _row(intent: str, tier: str, words: int, i: int) -> dict[str, Any]:
    question = " ".join(f"q{i}w{k}" for k in range(words - 2))
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"answer {intent}"}],
        "intent": intent,
        "tier": tier,
        "weight": 1.0,
    }


def snapshot(folder: Path, intents: dict[str, int], new_share: float, words: int = 10, kind: str = "sft", heldout: int = 4) -> Path:
    """A snapshot folder: `intents` rows per intent, the first `new_share` of them "problem", the rest
    replay ("candidate_baseline"); each row `words` whitespace tokens long (question + answer)."""
    folder.mkdir(parents=True)
    rows = [(intent, i) for intent, n in intents.items() for i in range(n)]
    new = round(new_share * len(rows))
    lines = [json.dumps(_row(intent, "problem" if k < new else "candidate_baseline", words, k)) for k, (intent, _) in enumerate(rows)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "heldout.jsonl").write_text("\n".join(lines[:heldout]) + "\n", encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"id": folder.name, "kind": kind}), encoding="utf-8")
    return folder


def _values(choice: auto.AutoChoice) -> dict[str, float]:
    return {k: getattr(choice, k) for k in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "learning_rate", "epochs")}


def test_gini_is_zero_for_equal_counts_and_grows_with_concentration() -> None:
    assert auto.gini([5, 5, 5, 5]) == 0.0
    assert auto.gini([0, 0, 0, 12]) == pytest.approx(0.75)  # (n-1)/n: one holds everything
    assert 0 < auto.gini([1, 2, 3, 10]) < auto.gini([1, 1, 1, 20])


def test_a_small_balanced_snapshot_keeps_the_settings(tmp_path: Path) -> None:
    train = TrainSettings()
    p = auto.profile(snapshot(tmp_path / "ds", {"a": 100, "b": 100, "c": 100, "d": 100}, new_share=0.5), train)
    assert (p.rows, p.heldout_rows, p.method, p.token_counter) == (400, 4, "sft", "whitespace")
    assert (p.tokens_p50, p.tokens_p95, p.tokens_max) == (10, 10, 10)
    assert (p.intents, p.intent_max_share, p.intent_min_share, p.intent_ratio, p.intent_gini) == (4, 0.25, 0.25, 1.0, 0.0)
    assert p.new_share == 0.5 and p.tiers == {"candidate_baseline": 200, "problem": 200}
    choice = auto.choose(p, train)
    # <= 1,000 rows: rank 8 and batch 8, the settings' own; so the rate stays; no skew, enough new rows
    assert _values(choice) == {"lora_r": 8, "lora_alpha": 16, "batch_size": 8, "grad_accum": 1, "learning_rate": 2e-4, "epochs": 2.0}
    assert [c.parameter for c in choice.choices] == ["lora_r", "lora_alpha", "batch_size", "learning_rate", "epochs"]


def test_a_skewed_replay_heavy_snapshot_trains_longer_at_a_smaller_rate(tmp_path: Path) -> None:
    train = TrainSettings()
    p = auto.profile(snapshot(tmp_path / "ds", {"common": 2700, "mid": 270, "rare": 30}, new_share=0.1), train)
    assert p.rows == 3000 and p.intent_ratio == 90.0 and p.intent_max_share == 0.9 and p.intent_min_share == 0.01
    assert p.intent_gini == pytest.approx(0.5933, abs=1e-4) and p.skewed and p.replay_heavy
    choice = auto.choose(p, train)
    # 1,000 < rows <= 10,000: rank 16, batch 16; rate x sqrt(16/8) x 0.5 (replay-heavy); epochs 2 +1 skew +1 replay
    assert _values(choice) == {
        "lora_r": 16,
        "lora_alpha": 32,
        "batch_size": 16,
        "grad_accum": 1,
        "learning_rate": pytest.approx(1.41e-4),
        "epochs": 4.0,
    }
    reasons = " | ".join(c.reason for c in choice.choices)
    assert "intents skewed (max/min share 90, Gini 0.59): +1" in reasons and "new problem rows are 10% (< 20%): x 0.5" in reasons
    # ... never beyond max_epochs
    assert auto.choose(p, TrainSettings(max_epochs=3)).epochs == 3.0


def test_long_rows_shrink_the_micro_batch_and_preference_methods_take_a_smaller_rate(tmp_path: Path) -> None:
    train = TrainSettings(max_length=1024)
    p = auto.profile(snapshot(tmp_path / "ds", {"a": 800, "b": 700}, new_share=0.6, words=600, kind="dpo"), train)
    assert (p.method, p.tokens_p95) == ("dpo", 600) and p.over_max_length == 0.0
    choice = auto.choose(p, train)
    # 16 x 600 tokens is over 8,192: micro-batch 8 x grad_accum 2 (effective 16); dpo: x 0.25
    assert (choice.batch_size, choice.grad_accum) == (8, 2)
    assert choice.learning_rate == pytest.approx(2e-4 * 2**0.5 * 0.25, rel=1e-2)
    # a max_length shorter than the rows bounds the micro-batch instead (rows are truncated to it)
    short = auto.profile(tmp_path / "ds", TrainSettings(max_length=256))
    assert short.over_max_length == 1.0 and short.method == "dpo"  # the manifest's kind
    assert (auto.choose(short, TrainSettings(max_length=256)).batch_size, auto.choose(short, TrainSettings(max_length=256)).grad_accum) == (
        16,
        1,
    )


def test_a_large_snapshot_takes_the_largest_rank_and_batch() -> None:
    p = auto.SnapshotProfile(
        dataset_dir="/x",
        method="sft",
        rows=50_000,
        heldout_rows=5_000,
        tokens_p50=80,
        tokens_p95=200,
        tokens_max=900,
        token_counter="tokenizer",
        over_max_length=0.01,
        intents=40,
        intent_max_share=0.05,
        intent_min_share=0.01,
        intent_ratio=5.0,
        intent_gini=0.2,
        new_share=0.3,
        tiers={"problem": 15_000, "core_baseline": 35_000},
    )
    choice = auto.choose(p, TrainSettings(lora_r=8, lora_alpha=8, batch_size=8, grad_accum=1, learning_rate=1e-3))
    # 32 x min(p95 200, max_length 256) = 6,400 tokens fit; alpha/r kept at 1; rate x sqrt(32/8) = 2
    assert _values(choice) == {"lora_r": 32, "lora_alpha": 32, "batch_size": 32, "grad_accum": 1, "learning_rate": 2e-3, "epochs": 2.0}


def test_an_empty_snapshot_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n")
    with pytest.raises(UserInputError, match="no rows to profile"):
        auto.profile(folder, TrainSettings())


def _project(project: Path, tiny_model_dir: Path) -> None:
    (project / "flywheel.toml").write_text(
        f'[train]\nbase_model = "{tiny_model_dir}"\nmin_steps = 0\nmax_length = 64\nmodules_to_save = []\n', encoding="utf-8"
    )


def test_cli_dry_run_prints_the_profile_and_the_reasons_and_trains_nothing(
    project: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(project, tiny_model_dir)
    folder = snapshot(tmp_path / "ds", {"common": 27, "rare": 3}, new_share=0.1, words=6)
    cli = ["-C", str(project), "train", "--dataset", str(folder), "--auto", "--dry-run"]
    assert main(cli) == 0
    out = capsys.readouterr().out
    assert f"profile of {folder}" in out and "method sft, 30 train rows, 4 held out" in out
    assert "tokens per row (tokenizer)" in out  # the base model's tokenizer counts
    assert "intents 2: max share 90.0%, min 10.0%, max/min 9, Gini 0.40" in out and "new problem rows 10.0%" in out
    assert "lora_r = 8: 30 train rows (<= 1,000): rank 8" in out
    assert "epochs = 3: new problem rows are 10%: +1 pass over them" in out
    assert "trains with lora_r 8, lora_alpha 16, learning_rate 0.0001, epochs 3, batch_size 8 x grad_accum 1" in out
    assert main([*cli, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["auto"]["profile"]["rows"] == 30 and document["auto"]["lora_r"] == 8
    assert document["spec"]["hyper"]["learning_rate"] == 1e-4 and document["spec"]["hyper"]["epochs"] == 3.0
    assert document["spec"]["notes"][0].startswith("auto lora_r 8:")
    assert main(["-C", str(project), "jobs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing trained
    assert main(["-C", str(project), "train", "--dataset", str(tmp_path / "missing"), "--auto", "--dry-run"]) != 0


def test_cli_auto_trains_with_the_chosen_settings(
    project: Path, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _project(project, tiny_model_dir)
    folder = snapshot(tmp_path / "ds", {"a": 12, "b": 12}, new_share=0.5, words=6)
    assert main(["-C", str(project), "train", "--dataset", str(folder), "--auto", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "succeeded" and document["version"] == "v2"
    hyper = document["spec"]["hyper"]
    chosen = document["auto"]
    assert {k: hyper[k] for k in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "learning_rate", "epochs")} == {
        k: chosen[k] for k in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "learning_rate", "epochs")
    }
    assert any(note.startswith("auto learning_rate") for note in document["spec"]["notes"])
