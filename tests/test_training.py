"""LoRA SFT and DPO runs on a tiny model, and per-sample loss weights applied in the loss."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from flywheel.demo.tiny_model import build_tiny_model, tiny_corpus
from flywheel.errors import UserInputError
from flywheel.inference.folders import ADAPTER_WEIGHTS
from flywheel.inference.local_model import LocalModel
from flywheel.settings_sections import TrainSettings
from flywheel.trainer import recipes
from flywheel.trainer.examples import load_examples

QUESTIONS = ["I want a refund", "Where is my order", "Can you waive the fee", "Talk to a human"]
ANSWERS = [
    "Refunds take five business days.",
    "Your order ships on Tuesday.",
    "The fee cannot be waived.",
    "I have escalated your request.",
]
BAD = "We guarantee a full refund today."


def write_snapshot(folder: Path, method: str, n_train: int = 16, n_heldout: int = 4, extra_rows: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)

    def row(i: int) -> dict:
        k = i % len(QUESTIONS)
        user = [{"role": "user", "content": QUESTIONS[k]}]
        if method == "sft":
            return {"messages": [*user, {"role": "assistant", "content": ANSWERS[k]}], "weight": 1.0, "intent": "x"}
        return {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": ANSWERS[k]}],
            "rejected": [{"role": "assistant", "content": BAD}],
            "weight": 1.0,
        }

    for split, n in (("train", n_train), ("heldout", n_heldout)):
        lines = [json.dumps(row(i)) for i in range(n)]
        if split == "train":
            lines += list(extra_rows)
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"id": f"ds-{method}", "kind": method}))
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tiny_corpus() + QUESTIONS + ANSWERS + [BAD]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", corpus, vocab_size=400, hidden=64)


def hyper(**overrides) -> TrainSettings:
    # min_steps 0: these runs count their steps and epochs exactly (the small-snapshot rule has its own test)
    values = dict(
        epochs=6.0, batch_size=4, learning_rate=2e-2, lora_r=8, lora_dropout=0.0, early_stopping_patience=0, warmup_ratio=0.0, min_steps=0
    )
    return TrainSettings(**{**values, **overrides})


@pytest.mark.slow
def test_sft_run_learns_and_writes_a_verifiable_adapter(base: Path, tmp_path: Path) -> None:
    data = write_snapshot(
        tmp_path / "sft", "sft", extra_rows=["not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
    )
    spec = recipes.build_spec(hyper(early_stopping_patience=2), data, base_model=base)  # best model kept at the end
    assert spec.method == "sft" and spec.dataset_id == "ds-sft"
    result = recipes.run(spec, tmp_path / "work")

    adapter = Path(result.adapter_path)
    weights = adapter / ADAPTER_WEIGHTS
    assert (adapter / "adapter_config.json").is_file() and weights.is_file()
    assert not list(adapter.glob("*.bin"))  # Trainer's pickled training_args.bin is removed
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result.adapter_sha256 == digest
    assert (adapter / "adapter.sha256").read_text().split()[0] == digest

    curve = json.loads(Path(result.curve_path).read_text())
    train_losses = [p["loss"] for p in curve["train"]]
    eval_losses = [p["loss"] for p in curve["eval"]]
    assert len(eval_losses) == 6  # one evaluation per epoch
    assert eval_losses[-1] < eval_losses[0] * 0.8
    assert sum(train_losses[-4:]) / 4 < sum(train_losses[:4]) / 4
    assert result.best_eval_loss == pytest.approx(min(eval_losses)) and result.steps == 24

    lineage = json.loads(Path(result.lineage_path).read_text())
    assert lineage["base_model"]["config_sha256"] == hashlib.sha256((base / "config.json").read_bytes()).hexdigest()
    assert lineage["dataset"]["content_hash"] == spec.dataset_hash and lineage["dataset"]["id"] == "ds-sft"
    assert [r["where"] for r in lineage["dataset"]["skipped_rows"]] == ["train.jsonl:17", "train.jsonl:18"]
    assert lineage["spec"]["hyper"]["learning_rate"] == 2e-2 and lineage["adapter_sha256"] == digest
    # the training recipe options, all off here, are recorded by name (tests/test_train_recipes.py turns them on)
    assert lineage["recipe"] == {"method": "sft", **recipes.RECIPE_DEFAULTS} and lineage["recipe"]["curriculum"] == "none"
    # the sizing rule's choice is recorded: a tiny model trains its embedding and output layer in full
    assert lineage["spec"]["hyper"]["modules_to_save"] == ["embed_tokens", "lm_head"] and lineage["spec"]["notes"]
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as saved:
        assert any("embed_tokens" in key for key in saved.keys()) and any("lm_head" in key for key in saved.keys())
    assert result.skipped_rows == 2

    # the adapter makes the trained answers likelier than the base model does
    model = LocalModel(base)
    model.load_adapter("trained", adapter, expected_sha256=digest)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    before = model.sequence_logprob(prompts, ANSWERS, adapter=None)
    after = model.sequence_logprob(prompts, ANSWERS, adapter="trained")
    assert all(a > b + 1.0 for a, b in zip(after, before))


@pytest.mark.slow
def test_dpo_run_prefers_chosen(base: Path, tmp_path: Path) -> None:
    data = write_snapshot(tmp_path / "dpo", "dpo")
    spec = recipes.build_spec(hyper(epochs=3.0, learning_rate=1e-2), data, base_model=base)
    assert spec.method == "dpo"  # from the manifest's kind
    result = recipes.run(spec, tmp_path / "work")
    assert hashlib.sha256((Path(result.adapter_path) / ADAPTER_WEIGHTS).read_bytes()).hexdigest() == result.adapter_sha256
    curve = json.loads(Path(result.curve_path).read_text())
    assert curve["train"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the adapter starts as a no-op
    assert curve["eval"][-1]["loss"] < 0.6

    model = LocalModel(base, adapter_path=result.adapter_path)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]

    def margin(adapter: str | None) -> list[float]:
        chosen = model.sequence_logprob(prompts, ANSWERS, adapter=adapter)
        rejected = model.sequence_logprob(prompts, [BAD] * 4, adapter=adapter)
        return [c - r for c, r in zip(chosen, rejected)]

    assert all(after > before for after, before in zip(margin("default"), margin(None)))


def _batch(trainer, weights: list[float]) -> dict:
    """A collated batch of the first rows of the prepared train set, as the dataloader would build it."""
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    rows = [dict(dataset[i], weight=w) for i, w in enumerate(weights)]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def _loss(trainer, weights: list[float]) -> float:
    batch = _batch(trainer, weights)
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_weights_scale_each_samples_loss(base: Path, tmp_path: Path, method: str) -> None:
    data = write_snapshot(tmp_path / method, method, n_train=2, n_heldout=0)
    rows, _ = load_examples(data, "train", method)
    rows[0]["weight"], rows[1]["weight"] = 2.5, 0.5
    spec = recipes.build_spec(hyper(), data, base_model=base)
    trainer = recipes.make_trainer(spec, rows, [], tmp_path / "ckpt")
    trainer.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh LoRA is a no-op (B = 0): every DPO pair would score exactly log 2
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)

    # the weight column survives TRL's preprocessing and Trainer's column pruning, in row order
    prepared = trainer._remove_unused_columns(trainer.train_dataset)
    assert "weight" in prepared.column_names and prepared["weight"] == [2.5, 0.5]
    assert _batch(trainer, [2.5, 0.5])["weight"].tolist() == [2.5, 0.5]

    # each sample's own loss, alone in a batch with weight 1
    single = []
    for i in range(2):
        batch = trainer._prepare_inputs(trainer.data_collator([dict(prepared[i], weight=1.0)]))
        with torch.no_grad():
            single.append(float(trainer.compute_loss(trainer.model, batch)))
    assert single[0] != pytest.approx(single[1], rel=1e-3)  # otherwise the check below proves nothing

    assert _loss(trainer, [1.0, 1.0]) == pytest.approx((single[0] + single[1]) / 2, rel=1e-4)
    assert _loss(trainer, [3.0, 1.0]) == pytest.approx((3 * single[0] + single[1]) / 2, rel=1e-4)
    assert _loss(trainer, [1.0, 3.0]) == pytest.approx((single[0] + 3 * single[1]) / 2, rel=1e-4)
    assert _loss(trainer, [0.0, 1.0]) == pytest.approx(single[1] / 2, rel=1e-4)


def test_bad_rows_are_skipped_and_an_empty_snapshot_refused(base: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "\n".join(
            [
                "{not json",
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
                json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "weight": -1}),
            ]
        )
        + "\n"
    )
    examples, skipped = load_examples(data, "train", "sft")
    assert examples == []
    assert [(s.where, s.why.split()[0]) for s in skipped] == [
        ("train.jsonl:1", "not"),
        ("train.jsonl:2", "messages"),
        ("train.jsonl:3", "a"),
        ("train.jsonl:4", "weight"),
    ]
    spec = recipes.build_spec(hyper(), data, method="sft", base_model=base)
    with pytest.raises(UserInputError, match="no usable training rows"):
        recipes.run(spec, tmp_path / "work")


def test_spec_identity_follows_content_and_hyper_parameters(base: Path, tmp_path: Path) -> None:
    one = write_snapshot(tmp_path / "one", "sft")
    two = write_snapshot(tmp_path / "two", "sft")  # same bytes, another folder
    spec = recipes.build_spec(hyper(), one, base_model=base)
    assert recipes.build_spec(hyper(), two, base_model=base).job_id() == spec.job_id()
    assert recipes.build_spec(hyper(learning_rate=1e-3), one, base_model=base).job_id() != spec.job_id()
    assert recipes.build_spec(hyper(), one, method="dpo", base_model=base).job_id() != spec.job_id()
    (two / "train.jsonl").write_text((two / "train.jsonl").read_text().replace("Tuesday", "Monday"))
    assert recipes.build_spec(hyper(), two, base_model=base).job_id() != spec.job_id()
    with pytest.raises(UserInputError, match="no base model"):
        recipes.build_spec(hyper(), one)
    with pytest.raises(UserInputError, match="does not exist"):
        recipes.build_spec(hyper(), tmp_path / "missing", base_model=base)


def test_sizing_rules_train_small_models_in_full_at_the_edges_and_small_snapshots_longer(base: Path, tmp_path: Path) -> None:
    from flywheel.trainer import sizing

    names, params = sizing.embedding_layers(base)
    assert names == ["embed_tokens", "lm_head"] and params == 2 * 400 * 64  # tied, but the adapter saves both copies
    rows = 590
    settings = TrainSettings(batch_size=16, epochs=4.0, min_steps=300, max_epochs=12.0)
    resolved, notes = sizing.resolve(settings, base, rows)
    assert resolved.modules_to_save == ["embed_tokens", "lm_head"]
    assert resolved.epochs == 9.0  # 37 steps per epoch: 9 epochs make 333 >= 300 steps
    assert any("epochs" in n for n in notes) and any("embed_tokens+lm_head" in n for n in notes)
    # a model whose edges are large (a pretrained LLM) keeps them frozen; a big snapshot keeps its epochs
    resolved, notes = sizing.resolve(settings.model_copy(update={"full_train_max_params": params - 1}), base, 100_000)
    assert resolved.modules_to_save == [] and resolved.epochs == 4.0 and "over train.full_train_max_params" in notes[0]
    # never beyond max_epochs; an explicit list is kept as it is; min_steps 0 turns the epoch rule off
    assert sizing.resolve(settings, base, 10)[0].epochs == 12.0
    explicit = settings.model_copy(update={"modules_to_save": ["lm_head"], "min_steps": 0})
    assert sizing.resolve(explicit, base, 10) == (explicit.model_copy(update={"modules_to_save": ["lm_head"]}), [])
    # build_spec resolves before the job id is derived, so the id follows what is trained
    data = write_snapshot(tmp_path / "sft", "sft", n_train=rows)
    spec = recipes.build_spec(settings, data, base_model=base)
    assert spec.hyper.epochs == 9.0 and spec.hyper.modules_to_save == ["embed_tokens", "lm_head"]
    assert spec.job_id() != recipes.build_spec(settings.model_copy(update={"modules_to_save": []}), data, base_model=base).job_id()
