"""The training recipes: LoRA SFT, DPO and KTO with TRL over a local base model and a dataset snapshot.

A `TrainSpec` says everything a run depends on (method, base model, dataset content, hyper-parameters); its
`identity()` is what a job id is derived from. `run(spec, work_dir)` trains and writes, under
`work_dir/adapter`:

    adapter_model.safetensors, adapter_config.json   the PEFT adapter (plus the tokenizer, for convenience)
    adapter.sha256                                   sha256 of adapter_model.safetensors
    curve.json                                       train and held-out loss per step
    lineage.json                                     base model + config hash, dataset id + hash, the spec

Checkpoints go to `work_dir/checkpoints`; a run that finds one there resumes from the newest.

The snapshot's rows become training examples in flywheel.trainer.examples; a row that does not fit is
skipped with its file, line and reason in the log and in lineage.json; the run fails only when no row is left.

The recipe options of [train] (curriculum, focal_gamma, anchor, dpo_loss_type; docs/learning.md) are part of
the spec, so of the job id and lineage.json; make_trainer applies them (flywheel.trainer.curriculum,
flywheel.trainer.anchor, flywheel.trainer.weighted).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flywheel.errors import UserInputError
from flywheel.inference.folders import ADAPTER_WEIGHTS, model_config_hash, resolve_base_model
from flywheel.records import stable_hash, utcnow
from flywheel.settings_sections import TrainSettings
from flywheel.store.vectors import sha256_file
from flywheel.trainer import sizing
from flywheel.trainer.examples import META_KEYS, SkippedRow, count_rows, dataset_content_hash, load_examples, read_manifest, split_file

if TYPE_CHECKING:
    from flywheel.trainer.weighted import WeightedDPOTrainer, WeightedKTOTrainer, WeightedSFTTrainer

    Trainers = WeightedSFTTrainer | WeightedDPOTrainer | WeightedKTOTrainer

log = logging.getLogger("flywheel.train")

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"

# Progress events: ("begin" | "step" | "log" | "save", fields such as step, total, epoch, loss, eval_loss,
# checkpoint). The worker writes them to the job row; a plain function keeps transformers out of its imports.
ProgressFn = Callable[[str, dict[str, Any]], None]

METHODS = ("sft", "dpo", "kto")
# The recipe options, with the value that turns each off. A spec leaves an option out of its identity while it
# is off, so the jobs of specs written before the options existed keep their ids.
RECIPE_OPTIONS = ("curriculum", "focal_gamma", "anchor", "anchor_strength", "anchor_fisher_rows", "dpo_loss_type", "dpo_label_smoothing")
RECIPE_DEFAULTS: dict[str, Any] = {key: TrainSettings.model_fields[key].default for key in RECIPE_OPTIONS}


class TrainSpec(BaseModel):
    """One training run, fully resolved. `hyper` carries the hyper-parameters (its own base_model and
    method are kept equal to the spec's)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["sft", "dpo", "kto"]
    base_model: str  # absolute folder
    base_config_hash: str
    dataset_dir: str  # absolute folder
    dataset_id: str = ""  # from manifest.json, when it has one
    dataset_hash: str  # sha256 over the split files' bytes
    hyper: TrainSettings = Field(default_factory=TrainSettings)  # resolved: no "auto" left (trainer.sizing)
    # the adapter training continues from (train.start_from "champion"), its folder and the sha256 of its
    # weights: the weights are checked before loading, and the sha256 is part of the identity
    init_adapter: str = ""
    init_adapter_sha256: str = ""
    notes: list[str] = []  # what the sizing rules decided, in words; not part of the identity

    @model_validator(mode="after")
    def _sync(self) -> TrainSpec:
        if self.hyper.base_model != self.base_model or self.hyper.method != self.method:
            self.hyper = self.hyper.model_copy(update={"base_model": self.base_model, "method": self.method})
        return self

    def identity(self) -> dict[str, Any]:
        """What the run's result depends on: equal identities give the same adapter."""
        hyper = self.hyper.model_dump(mode="json", exclude={"base_model", "method"})
        # options that change nothing unless another option is on: the same adapter, the same job
        moot = {"anchor_strength"} if self.hyper.anchor == "none" else set()
        moot |= {"anchor_fisher_rows"} if self.hyper.anchor != "ewc" else set()
        moot |= {"dpo_label_smoothing"} if self.hyper.dpo_loss_type != "robust" else set()
        hyper = {k: v for k, v in hyper.items() if k not in moot and not (k in RECIPE_DEFAULTS and v == RECIPE_DEFAULTS[k])}
        hyper.pop("start_from", None)  # what it resolved to is below: a fresh adapter or this one
        hyper.pop("launcher", None)  # where it runs changes nothing in the adapter
        identity = {
            "method": self.method,
            "base_model": self.base_model,
            "base_config_hash": self.base_config_hash,
            "dataset_hash": self.dataset_hash,
            "hyper": hyper,
        }
        if self.init_adapter_sha256:
            identity["init_adapter_sha256"] = self.init_adapter_sha256
        return identity

    def job_id(self) -> str:
        return f"{self.method}-{stable_hash(self.identity(), 16)}"


class TrainResult(BaseModel):
    adapter_path: str
    adapter_sha256: str
    curve_path: str
    lineage_path: str
    steps: int
    epochs: float
    train_loss: float | None
    best_eval_loss: float | None
    resumed_from: str | None = None
    skipped_rows: int = 0


# --- building a spec ----------------------------------------------------------------------------------------


def build_spec(
    train: TrainSettings,
    dataset_dir: Path | str,
    *,
    method: str | None = None,
    base_model: Path | str | None = None,
    init_adapter: tuple[str, str] | None = None,
) -> TrainSpec:
    """A spec from the settings' [train] section, a snapshot folder and optional overrides. The method
    defaults to the snapshot's kind (manifest "kind"), then to train.method; train.method "kto" is not a
    snapshot kind and wins over it (KTO trains on either kind). `init_adapter` (folder, sha256 of its
    weights): the adapter training continues from, used when train.start_from is "champion"."""
    folder = Path(dataset_dir).resolve()
    if not folder.is_dir():
        raise UserInputError(f"dataset snapshot {folder} does not exist")
    if split_file(folder, "train") is None:
        raise UserInputError(f"dataset snapshot {folder} has no train.jsonl or train.parquet")
    manifest = read_manifest(folder)
    chosen = method or ("kto" if train.method == "kto" else None) or manifest.get("kind") or train.method
    if chosen not in METHODS:
        raise UserInputError(f"training method {chosen!r} is not one of {', '.join(METHODS)}")
    if train.focal_gamma > 0 and chosen != "sft":
        raise UserInputError(f"train.focal_gamma applies to sft only (a per-token loss on the answer), not to {chosen}: set it to 0")
    if train.dpo_loss_type != "sigmoid" and chosen != "dpo":
        raise UserInputError(f"train.dpo_loss_type {train.dpo_loss_type!r} applies to dpo only, not to {chosen}: set it to sigmoid")
    base = base_model or train.base_model
    if not base:
        raise UserInputError("no base model: pass --base PATH or set train.base_model in flywheel.toml")
    base_path = resolve_base_model(base).resolve()  # a folder or a cached hub id, checked
    train_path = split_file(folder, "train")
    assert train_path is not None  # checked above
    rows = count_rows(train_path)
    if chosen == "kto" and manifest.get("kind") == "dpo":
        rows *= 2  # each pair gives a desirable and an undesirable example
    hyper, notes = sizing.resolve(train, base_path, rows)
    for note in notes:
        log.info("recipe: %s", note)
    return TrainSpec(
        method=chosen,
        base_model=str(base_path),
        base_config_hash=model_config_hash(base_path),
        dataset_dir=str(folder),
        dataset_id=str(manifest.get("id") or manifest.get("snapshot_id") or ""),
        dataset_hash=dataset_content_hash(folder),
        hyper=hyper,
        notes=notes,
        **_start(train, init_adapter),
    )


def _start(train: TrainSettings, init_adapter: tuple[str, str] | None) -> dict[str, str]:
    if train.start_from != "champion" or init_adapter is None:
        return {}
    folder, sha256 = init_adapter
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise UserInputError(f"the adapter to continue from, {folder}, has no {ADAPTER_WEIGHTS}")
    return {"init_adapter": str(Path(folder).resolve()), "init_adapter_sha256": sha256}


# --- running ------------------------------------------------------------------------------------------------


def _precision() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16, "activation_checkpointing": True}
    return {"use_cpu": True, "bf16": False, "fp16": False, "activation_checkpointing": False}


def _common_args(spec: TrainSpec, checkpoints: Path, has_eval: bool) -> dict[str, Any]:
    hyper = spec.hyper
    by_steps = hyper.eval_steps > 0
    strategy = "steps" if by_steps else "epoch"
    early = has_eval and hyper.early_stopping_patience > 0
    args: dict[str, Any] = {
        "output_dir": str(checkpoints),
        "num_train_epochs": hyper.epochs,
        "learning_rate": hyper.learning_rate,
        "per_device_train_batch_size": hyper.batch_size,
        "per_device_eval_batch_size": hyper.batch_size,
        "gradient_accumulation_steps": hyper.grad_accum,
        "lr_scheduler_type": "cosine",
        "warmup_steps": hyper.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "max_grad_norm": hyper.max_grad_norm,
        "max_length": hyper.max_length,
        "seed": hyper.seed,
        "data_seed": hyper.seed,
        "logging_strategy": "steps",
        "logging_steps": 0.01,  # a float below 1: every 1% of the steps, and every step for short runs
        "logging_first_step": True,
        "eval_strategy": strategy if has_eval else "no",
        "save_strategy": strategy,
        "save_total_limit": 2,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
        "report_to": "none",
        "disable_tqdm": True,
        "remove_unused_columns": True,  # the weighted trainers keep `weight` among the columns
        "dataloader_num_workers": 0,
        "save_only_model": False,  # optimizer and scheduler state are what a resume needs
        **_precision(),
    }
    if by_steps:
        args["eval_steps"] = hyper.eval_steps
        args["save_steps"] = hyper.eval_steps
    return args


def _lora(spec: TrainSpec):
    from peft import LoraConfig

    hyper = spec.hyper
    return LoraConfig(
        r=hyper.lora_r,
        lora_alpha=hyper.lora_alpha,
        lora_dropout=hyper.lora_dropout,
        target_modules=hyper.target_modules,
        modules_to_save=_modules_to_save(spec) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _modules_to_save(spec: TrainSpec) -> list[str]:
    """build_spec resolves "auto" (trainer.sizing); a spec written by hand may still carry it."""
    modules = spec.hyper.modules_to_save
    if modules == "auto":
        return sizing.auto_modules(Path(spec.base_model), spec.hyper.full_train_max_params)[0]
    return list(modules)


def load_for_training(base_model: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.float32 if not torch.cuda.is_available() else "auto"
    model = AutoModelForCausalLM.from_pretrained(base_model, local_files_only=True, use_safetensors=True, dtype=dtype)
    return model, tokenizer


def make_trainer(
    spec: TrainSpec,
    train_examples: Sequence[dict[str, Any]],
    heldout_examples: Sequence[dict[str, Any]],
    checkpoints: Path,
    callbacks: Sequence[Any] = (),
) -> Trainers:
    """The weighted TRL trainer for a spec with its recipe options applied, ready to `.train()`. Raises
    UserInputError when a recipe cannot apply to the rows (EWC without replay rows)."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import DPOConfig, KTOConfig, SFTConfig

    from flywheel.trainer import anchor, curriculum
    from flywheel.trainer.weighted import WeightedDPOTrainer, WeightedKTOTrainer, WeightedSFTTrainer

    hyper = spec.hyper
    has_eval = len(heldout_examples) > 0
    model, tokenizer = load_for_training(spec.base_model)
    if spec.init_adapter:
        model = _continue_from(model, spec)
    args = _common_args(spec, checkpoints, has_eval)
    all_callbacks = list(callbacks)
    if args["load_best_model_at_end"]:
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=hyper.early_stopping_patience))
    train_rows = list(train_examples)
    if spec.method == "kto" and hyper.curriculum == "none":
        # KTOTrainer reads rows in order; unshuffled, a pair's two answers would sit side by side and its KL
        # estimate (each prompt with its neighbour's answer) would pair a prompt with its own other answer.
        import random

        random.Random(hyper.seed).shuffle(train_rows)
    if hyper.curriculum != "none":
        # The starting model is the base (a fresh adapter is a no-op): score the rows before wrapping it.
        order = curriculum.order(train_rows, hyper.curriculum, model=model, tokenizer=tokenizer, max_length=hyper.max_length)
        train_rows = [train_rows[i] for i in order]
    train_ds = Dataset.from_list([_for_trl(e) for e in train_rows])
    eval_ds = Dataset.from_list([_for_trl(e) for e in heldout_examples]) if has_eval else None
    config: SFTConfig | DPOConfig | KTOConfig
    trainer_cls: type[Trainers]
    if spec.method == "sft":
        config = SFTConfig(**args, completion_only_loss=True, assistant_only_loss=False, packing=False)
        trainer_cls = WeightedSFTTrainer
    elif spec.method == "dpo":
        config = DPOConfig(**args, beta=hyper.dpo_beta, loss_type=[hyper.dpo_loss_type], label_smoothing=hyper.dpo_label_smoothing)
        trainer_cls = WeightedDPOTrainer
    else:
        config = KTOConfig(**args, beta=hyper.dpo_beta)
        trainer_cls = WeightedKTOTrainer
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=None if spec.init_adapter else _lora(spec),  # a continued adapter keeps its own LoRA shape
        callbacks=all_callbacks,
    )
    trainer.curriculum = hyper.curriculum != "none"
    if isinstance(trainer, WeightedSFTTrainer):
        trainer.focal_gamma = hyper.focal_gamma
    try:
        trainer.anchor = anchor.build(
            hyper.anchor, hyper.anchor_strength, trainer.model, tokenizer, train_rows, hyper.max_length, hyper.anchor_fisher_rows
        )
    except ValueError as exc:
        raise UserInputError(f"dataset snapshot {spec.dataset_dir}: train.{exc}") from None
    return trainer


def _continue_from(model: Any, spec: TrainSpec) -> Any:
    """The base model with the champion's adapter loaded trainable, after checking its weights' sha256:
    training goes on from what was shipped (its rank, targets and modules_to_save come with it)."""
    from peft import PeftModel

    weights = Path(spec.init_adapter) / ADAPTER_WEIGHTS
    found = sha256_file(weights)
    if spec.init_adapter_sha256 and found != spec.init_adapter_sha256:
        raise UserInputError(f"{weights}: sha256 {found[:12]} is not the recorded {spec.init_adapter_sha256[:12]}; not continuing from it")
    return PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)


def _for_trl(example: dict[str, Any]) -> dict[str, Any]:
    """The example without the row facts only the recipes read (examples.META_KEYS)."""
    return {k: v for k, v in example.items() if k not in META_KEYS}


def _curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "epoch": e.get("epoch", 0.0), "loss": e["loss"]} for e in log_history if "loss" in e]
    held = [{"step": e["step"], "epoch": e.get("epoch", 0.0), "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": held}


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint that was written to the end. Trainer writes trainer_state.json last, so a
    checkpoint without it was cut short by a kill; such folders are removed so that neither the resume nor
    Trainer's checkpoint rotation trips over them."""
    import shutil

    found = sorted(
        (int(path.name.split("-", 1)[1]), path)
        for path in checkpoints.glob("checkpoint-*")
        if path.is_dir() and path.name.split("-", 1)[1].isdigit()
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file() and any(path.glob("*.safetensors")):
            return str(path)
        log.warning("removing incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def progress_callback(on_progress: ProgressFn):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            on_progress("begin", {"step": state.global_step, "total": state.max_steps})

        def on_step_end(self, args, state, control, **kwargs):
            on_progress("step", {"step": state.global_step, "total": state.max_steps, "epoch": state.epoch})

        def on_log(self, args, state, control, logs=None, **kwargs):
            losses = {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "eval_loss")}
            if losses:
                on_progress("log", losses)

        def on_save(self, args, state, control, **kwargs):
            on_progress("save", {"checkpoint": state.global_step})

    return _Progress()


def run(spec: TrainSpec, work_dir: Path | str, on_progress: ProgressFn | None = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train the adapter a spec describes, resuming from the newest checkpoint in `work_dir` if any.
    Checks the snapshot before importing the training stack, so a bad job fails in a second."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(work_dir)
    dataset_dir = Path(spec.dataset_dir)
    if not dataset_dir.is_dir():
        raise UserInputError(f"dataset snapshot {dataset_dir} does not exist")
    if dataset_content_hash(dataset_dir) != spec.dataset_hash:
        raise UserInputError(f"dataset snapshot {dataset_dir} changed since the job was created (content hash differs)")
    train_examples, skipped = load_examples(dataset_dir, "train", spec.method)
    heldout_examples, skipped_heldout = load_examples(dataset_dir, "heldout", spec.method)
    skipped += skipped_heldout
    if not train_examples:
        raise UserInputError(f"dataset snapshot {dataset_dir}: no usable training rows ({len(skipped)} skipped)")
    log.info("training %s on %d rows (%d held out, %d skipped)", spec.method, len(train_examples), len(heldout_examples), len(skipped))

    checkpoints = work / CHECKPOINT_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    last = last_complete_checkpoint(checkpoints)
    all_callbacks = [*callbacks, progress_callback(on_progress)] if on_progress else list(callbacks)
    trainer = make_trainer(spec, train_examples, heldout_examples, checkpoints, all_callbacks)
    if last:
        log.info("resuming from %s", last)
    output = trainer.train(resume_from_checkpoint=last)

    adapter_dir = work / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    # Trainer pickles its arguments beside the model; an adapter folder holds no pickle.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise RuntimeError(f"the trainer did not write {weights}")
    digest = sha256_file(weights)
    (adapter_dir / "adapter.sha256").write_text(f"{digest}  {ADAPTER_WEIGHTS}\n", encoding="utf-8")

    curve = _curve(trainer.state.log_history)
    curve_path = adapter_dir / "curve.json"
    curve_path.write_text(json.dumps(curve, indent=1), encoding="utf-8")
    lineage_path = adapter_dir / "lineage.json"
    lineage_path.write_text(json.dumps(_lineage(spec, digest, skipped, last), indent=1, default=str), encoding="utf-8")
    best = trainer.state.best_metric if trainer.args.load_best_model_at_end else None
    if best is None and curve["eval"]:
        best = min(point["loss"] for point in curve["eval"])
    return TrainResult(
        adapter_path=str(adapter_dir),
        adapter_sha256=digest,
        curve_path=str(curve_path),
        lineage_path=str(lineage_path),
        steps=trainer.state.global_step,
        epochs=float(trainer.state.epoch or 0.0),
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        best_eval_loss=best,
        resumed_from=last,
        skipped_rows=len(skipped),
    )


def _lineage(spec: TrainSpec, digest: str, skipped: list[SkippedRow], resumed_from: str | None) -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    manifest_path = Path(spec.dataset_dir) / "manifest.json"
    return {
        "adapter_sha256": digest,
        "base_model": {"path": spec.base_model, "config_sha256": spec.base_config_hash},
        "dataset": {
            "path": spec.dataset_dir,
            "id": spec.dataset_id,
            "content_hash": spec.dataset_hash,
            "manifest_sha256": sha256_file(manifest_path) if manifest_path.is_file() else None,
            "skipped_rows": [row.model_dump() for row in skipped],
        },
        "spec": spec.model_dump(mode="json"),
        "recipe": {key: getattr(spec.hyper, key) for key in ("method", *RECIPE_OPTIONS)},
        "job_id": spec.job_id(),
        "resumed_from": resumed_from,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "created_at": utcnow().isoformat(),
    }
