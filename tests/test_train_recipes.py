"""The training recipes of [train]: curriculum order, focal loss, L2/EWC anchors, KTO and the DPO loss variants.

Each option is checked to change training itself (the loss or the gradient on the same batch, the order
rows are read in, a penalty that grows from zero), on the tiny model test_training.py builds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_training import ANSWERS, BAD, QUESTIONS, base, hyper, write_snapshot  # noqa: F401  # base: the shared tiny model fixture

from flywheel.errors import SettingsError, UserInputError
from flywheel.inference.folders import ADAPTER_WEIGHTS
from flywheel.inference.local_model import LocalModel
from flywheel.settings import load_settings
from flywheel.settings_sections import TrainSettings
from flywheel.trainer import curriculum, recipes
from flywheel.trainer.examples import load_examples
from flywheel.trainer.weighted import DPO_LOSS_TYPES


def tiered_snapshot(folder: Path, method: str = "sft") -> Path:
    """write_snapshot's rows with intents of different sizes and answers of different lengths, half of them replay."""
    write_snapshot(folder, method, n_train=8, n_heldout=0)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["intent"] = "common" if i < 5 else f"rare{i}"
        row["tier"] = "problem" if i % 2 else "core_baseline"
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def trainer_for(base: Path, tmp_path: Path, method: str = "sft", **options):
    data = tiered_snapshot(tmp_path / f"data-{method}", "dpo" if method in ("dpo", "kto") else "sft")
    spec = recipes.build_spec(hyper(**options), data, method=method, base_model=base)
    rows, _ = load_examples(data, "train", method)
    return recipes.make_trainer(spec, rows, [], tmp_path / "ckpt"), rows


def batch_of(trainer, n: int = 4) -> dict:
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(n)]))


def grads(trainer, batch: dict) -> torch.Tensor:
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad and p.grad is not None])


# --- settings and identity ---------------------------------------------------------------------------------


def test_bad_recipe_values_are_refused_with_the_key(project: Path, base: Path, tmp_path: Path) -> None:
    for key, value, expected in [
        ("curriculum", '"hardest_first"', "setting train.curriculum"),
        ("anchor", '"ewc2"', "setting train.anchor"),
        ("focal_gamma", "-1", "setting train.focal_gamma"),
        ("dpo_loss_type", '"kto_pair"', "setting train.dpo_loss_type"),
        ("method", '"ppo"', "setting train.method"),
        ("dpo_loss_type", '"robust"', "dpo_label_smoothing above 0"),
    ]:
        (project / "flywheel.toml").write_text(f"[train]\n{key} = {value}\n")
        with pytest.raises(SettingsError, match=re.escape(expected)):
            load_settings(project)
    data = write_snapshot(tmp_path / "dpo", "dpo")
    with pytest.raises(UserInputError, match="focal_gamma applies to sft only"):
        recipes.build_spec(hyper(focal_gamma=2.0), data, base_model=base)
    with pytest.raises(UserInputError, match="dpo_loss_type 'ipo' applies to dpo only"):
        recipes.build_spec(hyper(dpo_loss_type="ipo"), data, method="kto", base_model=base)


def test_every_option_is_part_of_the_job_id(base: Path, tmp_path: Path) -> None:
    data = write_snapshot(tmp_path / "sft", "sft")
    plain = recipes.build_spec(hyper(), data, base_model=base)
    assert not set(recipes.RECIPE_OPTIONS) & set(plain.identity()["hyper"])  # off: the ids of older jobs stand
    assert recipes.build_spec(hyper(anchor_strength=5.0), data, base_model=base).job_id() == plain.job_id()  # no anchor: moot
    changed = [
        dict(curriculum="difficulty"),
        dict(curriculum="champion_loss"),
        dict(focal_gamma=1.0),
        dict(anchor="l2"),
        dict(anchor="ewc"),
        dict(anchor="l2", anchor_strength=5.0),
    ]
    ids = {recipes.build_spec(hyper(**c), data, base_model=base).job_id() for c in changed}
    l2 = recipes.build_spec(hyper(anchor="l2"), data, base_model=base)
    assert recipes.build_spec(hyper(anchor="l2", anchor_fisher_rows=7), data, base_model=base).job_id() == l2.job_id()  # ewc only
    assert len(ids) == len(changed) and plain.job_id() not in ids
    dpo = write_snapshot(tmp_path / "dpo", "dpo")
    dpo_ids = {
        recipes.build_spec(hyper(**c), dpo, base_model=base).job_id()
        for c in (dict(), dict(dpo_loss_type="ipo"), dict(dpo_loss_type="robust", dpo_label_smoothing=0.1), dict(method="kto"))
    }
    assert len(dpo_ids) == 4
    kto = recipes.build_spec(hyper(method="kto"), dpo, base_model=base)  # kto wins over the snapshot's kind
    assert kto.method == "kto" and kto.job_id().startswith("kto-")
    # the KTO rows of a DPO snapshot are two per pair: the small-snapshot rule counts them so
    assert recipes.build_spec(hyper(method="kto", epochs=1.0, min_steps=16), dpo, base_model=base).hyper.epochs == 2.0  # 8 steps/epoch
    assert recipes.build_spec(hyper(epochs=1.0, min_steps=16), dpo, base_model=base).hyper.epochs == 4.0  # dpo: 16 pairs, 4 steps/epoch


# --- curriculum --------------------------------------------------------------------------------------------


def test_difficulty_orders_common_intents_and_short_answers_first() -> None:
    rows = [
        {"prompt": [], "completion": [{"role": "assistant", "content": "a long answer here"}], "intent": "rare"},
        {"prompt": [], "completion": [{"role": "assistant", "content": "a much longer answer"}], "intent": "common"},
        {"prompt": [], "completion": [{"role": "assistant", "content": "short"}], "intent": "common"},
        {"prompt": [], "completion": [{"role": "assistant", "content": "tiny"}], "intent": "mid"},
        {"prompt": [], "completion": [{"role": "assistant", "content": "x"}], "intent": "mid"},
        {"prompt": [], "completion": [{"role": "assistant", "content": "y"}], "intent": "common"},
    ]
    assert curriculum.order(rows, "difficulty") == [5, 2, 1, 4, 3, 0]
    assert curriculum.order(rows, "none") == list(range(6))


@pytest.mark.parametrize("mode", ["champion_loss", "difficulty"])
def test_curriculum_rows_are_read_easy_to_hard_every_epoch(base: Path, tmp_path: Path, mode: str) -> None:
    from flywheel.trainer.rowloss import answer_losses

    plain, rows = trainer_for(base, tmp_path / "plain")
    ordered, _ = trainer_for(base, tmp_path / "ordered", curriculum=mode)
    model, tokenizer = recipes.load_for_training(str(base))
    expected = curriculum.order(rows, mode, model=model, tokenizer=tokenizer)
    assert expected != list(range(len(rows)))  # the snapshot's own order is not already easy -> hard

    def answers(trainer) -> list[str]:
        return [row["completion"][0]["content"] for row in trainer.train_dataset]

    assert answers(ordered) == [rows[i]["completion"][0]["content"] for i in expected]
    assert answers(plain) == [row["completion"][0]["content"] for row in rows]
    if mode == "champion_loss":
        losses = answer_losses(model, tokenizer, rows, 256)
        assert [losses[i] for i in expected] == sorted(losses)  # lowest starting loss first
    else:
        assert [rows[i]["intent"] for i in expected][:5] == ["common"] * 5
    # the rows are read in that order, every epoch; without a curriculum Trainer's sampler shuffles them
    sampler = ordered._get_train_sampler()
    assert list(sampler) == list(sampler) == list(range(len(rows)))
    assert not isinstance(plain._get_train_sampler(), torch.utils.data.SequentialSampler)


# --- focal loss --------------------------------------------------------------------------------------------


def test_focal_loss_changes_the_loss_and_keeps_the_row_weights(base: Path, tmp_path: Path) -> None:
    trainer, _ = trainer_for(base, tmp_path, focal_gamma=2.0)
    trainer.model.train()
    batch = batch_of(trainer)
    with torch.no_grad():
        focal = float(trainer.compute_loss(trainer.model, dict(batch)))
        trainer.focal_gamma = 0.0
        plain = float(trainer.compute_loss(trainer.model, dict(batch)))
        assert 0 < focal < plain  # (1 - p)^2 < 1 on every token
        trainer.focal_gamma = 2.0
        doubled = float(trainer.compute_loss(trainer.model, {**batch, "weight": batch["weight"] * 2}))
    assert doubled == pytest.approx(2 * focal, rel=1e-5)
    g_focal = grads(trainer, batch)
    trainer.focal_gamma = 0.0
    g_plain = grads(trainer, batch)
    cosine = torch.nn.functional.cosine_similarity(g_focal, g_plain, dim=0)
    assert float(cosine) < 0.9999  # a different direction, not only a smaller step
    # the held-out loss stays the plain one, so early stopping compares like with like
    trainer.focal_gamma = 2.0
    trainer.model.eval()
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model, dict(batch))) == pytest.approx(plain, rel=1e-5)


# --- anchors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "ewc"])
def test_anchor_penalty_is_zero_at_the_start_and_grows_after_a_step(base: Path, tmp_path: Path, kind: str) -> None:
    trainer, rows = trainer_for(base, tmp_path, anchor=kind, anchor_strength=10.0)
    anchor = trainer.anchor
    assert anchor is not None and float(anchor.penalty()) == 0.0
    if kind == "ewc":
        assert anchor.fisher is not None
        total = sum(float(f.sum()) for f in anchor.fisher)
        count = sum(f.numel() for f in anchor.fisher)
        assert total / count == pytest.approx(1.0, rel=1e-4)  # normalised to mean 1
        assert len({round(float(f.max()), 6) for f in anchor.fisher}) > 1  # weights differ: not L2 in disguise
    trainer.model.train()
    batch = batch_of(trainer)
    with torch.no_grad():
        first = float(trainer.compute_loss(trainer.model, dict(batch)))
    trainer.anchor = None
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model, dict(batch))) == pytest.approx(first)  # 0 at the start
    trainer.anchor = anchor
    trainer.args.max_steps = 2
    trainer.train()
    moved = float(anchor.penalty())
    assert moved > 0
    # the penalty is in the training loss, and its gradient pulls the weights back towards the start
    trainer.model.train()
    with torch.no_grad():
        with_anchor = float(trainer.compute_loss(trainer.model, dict(batch)))
        trainer.anchor = None
        without = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert with_anchor == pytest.approx(without + moved, rel=1e-5)
    trainer.anchor = anchor
    trainer.model.zero_grad()
    anchor.penalty().backward()
    pull = sum(float(((p - s) * p.grad).sum()) for p, s in zip(anchor.params, anchor.start) if p.grad is not None)
    assert pull > 0  # the gradient points away from the start: descending it goes back
    assert "anchor_penalty" in trainer.state.log_history[0] or any("anchor_penalty" in e for e in trainer.state.log_history)


def test_ewc_without_replay_rows_is_refused(base: Path, tmp_path: Path) -> None:
    data = write_snapshot(tmp_path / "sft", "sft", n_heldout=0)  # no tier on any row
    spec = recipes.build_spec(hyper(anchor="ewc"), data, base_model=base)
    with pytest.raises(UserInputError, match="train.anchor ewc estimates the Fisher information on the snapshot's replay rows"):
        recipes.run(spec, tmp_path / "work")


# --- DPO loss variants -------------------------------------------------------------------------------------


def test_dpo_loss_types_are_trls_and_weighted(base: Path, tmp_path: Path) -> None:
    from trl import DPOConfig, DPOTrainer

    documented = set(re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert set(DPO_LOSS_TYPES) <= documented  # every type offered is one the installed TRL knows
    assert set(TrainSettings.model_fields["dpo_loss_type"].annotation.__args__) == set(DPO_LOSS_TYPES)

    data = write_snapshot(tmp_path / "dpo", "dpo", n_train=4, n_heldout=0)
    rows, _ = load_examples(data, "train", "dpo")
    losses = {}
    for loss_type in DPO_LOSS_TYPES:
        smoothing = 0.1 if loss_type == "robust" else 0.0
        spec = recipes.build_spec(hyper(dpo_loss_type=loss_type, dpo_label_smoothing=smoothing), data, base_model=base)
        trainer = recipes.make_trainer(spec, rows, [], tmp_path / loss_type)
        torch.manual_seed(0)
        with torch.no_grad():  # a fresh adapter scores every pair alike: move it
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        trainer.model.eval()
        dataset = trainer._remove_unused_columns(trainer.train_dataset)
        batch = trainer._prepare_inputs(trainer.data_collator([dict(dataset[i], weight=1.0) for i in range(2)]))
        with torch.no_grad():
            ours = float(trainer.compute_loss(trainer.model, dict(batch)))
            trls = float(DPOTrainer._compute_loss(trainer, trainer.model, {k: v for k, v in batch.items() if k != "weight"}, False))
            weighted = float(trainer.compute_loss(trainer.model, {**batch, "weight": torch.tensor([3.0, 0.0])}))
            first = trainer._prepare_inputs(trainer.data_collator([dict(dataset[0], weight=1.0)]))
            alone = float(trainer.compute_loss(trainer.model, dict(first)))
        assert ours == pytest.approx(trls, rel=1e-5), loss_type
        assert weighted == pytest.approx(3 * alone / 2, rel=1e-4), loss_type
        losses[loss_type] = ours
    assert len({round(v, 6) for v in losses.values()}) == len(losses)  # each type is its own loss


# --- KTO ---------------------------------------------------------------------------------------------------


def test_kto_examples_from_sft_and_dpo_rows(tmp_path: Path) -> None:
    rows, _ = load_examples(write_snapshot(tmp_path / "dpo", "dpo", n_train=2), "train", "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [
        (ANSWERS[0], True),
        (BAD, False),
        (ANSWERS[1], True),
        (BAD, False),
    ]
    rows, _ = load_examples(write_snapshot(tmp_path / "sft", "sft", n_train=2), "train", "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [(ANSWERS[0], True), (ANSWERS[1], True)]


def test_kto_weights_scale_each_examples_loss(base: Path, tmp_path: Path) -> None:
    trainer, _ = trainer_for(base, tmp_path, method="kto")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trainer.model.eval()
    batch = batch_of(trainer, 4)
    assert batch["label"].tolist().count(True) not in (0, 4)  # shuffled: both kinds in one batch
    with torch.no_grad():
        ones = float(trainer.compute_loss(trainer.model, {**batch, "weight": torch.ones(4)}))
        twos = float(trainer.compute_loss(trainer.model, {**batch, "weight": torch.full((4,), 2.0)}))
        first_only = float(trainer.compute_loss(trainer.model, {**batch, "weight": torch.tensor([1.0, 0.0, 0.0, 0.0])}))
        rest = float(trainer.compute_loss(trainer.model, {**batch, "weight": torch.tensor([0.0, 1.0, 1.0, 1.0])}))
    assert twos == pytest.approx(2 * ones, rel=1e-5)
    assert first_only + rest == pytest.approx(ones, rel=1e-5) and first_only > 0
    assert trainer.desirable_weight == 1.0 and trainer.undesirable_weight == 1.0  # restored after the batch


@pytest.mark.slow
def test_kto_trains_end_to_end_and_writes_an_adapter(base: Path, tmp_path: Path) -> None:
    data = write_snapshot(tmp_path / "dpo", "dpo")
    spec = recipes.build_spec(
        hyper(method="kto", epochs=3.0, learning_rate=1e-2, curriculum="difficulty", anchor="l2"), data, base_model=base
    )
    result = recipes.run(spec, tmp_path / "work")
    adapter = Path(result.adapter_path)
    assert (adapter / ADAPTER_WEIGHTS).is_file() and result.steps == 24  # 32 unpaired rows / 4 x 3 epochs
    lineage = json.loads(Path(result.lineage_path).read_text())
    assert lineage["recipe"] == {
        "method": "kto",
        "curriculum": "difficulty",
        "focal_gamma": 0.0,
        "anchor": "l2",
        "anchor_strength": 1.0,
        "anchor_fisher_rows": 128,
        "dpo_loss_type": "sigmoid",
        "dpo_label_smoothing": 0.0,
    }
    assert lineage["spec"]["method"] == "kto" and lineage["job_id"] == spec.job_id()
    model = LocalModel(base, adapter_path=result.adapter_path)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]

    def margin(adapter: str | None) -> float:
        good = model.sequence_logprob(prompts, ANSWERS, adapter=adapter)
        bad = model.sequence_logprob(prompts, [BAD] * 4, adapter=adapter)
        return sum(g - b for g, b in zip(good, bad))

    assert margin("default") > margin(None)  # the desirable answers gained on the undesirable one


# --- continuing from the champion's adapter -------------------------------------------------------------------


def test_training_continues_from_the_champions_adapter(base: Path, tmp_path: Path) -> None:
    """train.start_from "champion": the new adapter starts as the shipped one (its LoRA shape and weights,
    checked by sha256) and the job is another job than a fresh start on the same data."""
    from agent_helpers import fresh_adapter

    from flywheel.store.vectors import sha256_file

    shipped = fresh_adapter(base, tmp_path / "champion")  # rank 2 on q_proj and v_proj
    digest = sha256_file(shipped / ADAPTER_WEIGHTS)
    data = write_snapshot(tmp_path / "sft", "sft", n_train=8, n_heldout=0)
    fresh = recipes.build_spec(hyper(epochs=1.0), data, base_model=base)
    continued = recipes.build_spec(hyper(epochs=1.0), data, base_model=base, init_adapter=(str(shipped), digest))
    assert continued.init_adapter == str(shipped.resolve()) and continued.job_id() != fresh.job_id()
    from_base = recipes.build_spec(hyper(epochs=1.0, start_from="base"), data, base_model=base, init_adapter=(str(shipped), digest))
    assert not from_base.init_adapter and from_base.job_id() == fresh.job_id()

    result = recipes.run(continued, tmp_path / "work")
    config = json.loads((Path(result.adapter_path) / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # the champion's shape, not lora_r 8
    lineage = json.loads(Path(result.lineage_path).read_text())
    assert lineage["spec"]["init_adapter_sha256"] == digest

    (shipped / ADAPTER_WEIGHTS).write_bytes((shipped / ADAPTER_WEIGHTS).read_bytes()[:-8] + b"tampered")
    rows, _ = load_examples(data, "train", "sft")
    with pytest.raises(UserInputError, match="not the recorded"):
        recipes.make_trainer(continued, rows, [], tmp_path / "ckpt")
