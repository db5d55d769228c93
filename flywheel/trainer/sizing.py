"""How a recipe sizes itself to the base model and the snapshot: two documented rules, both from settings.

Measured with `bench/recipe.py` on a 40-intent pack without a knowledge base (a 2-layer, 128-wide Llama
trained from scratch, a 590-row snapshot of 295 labelled failures plus stable production replay; task
success of the base model 25.7% on 600 untouched test rows):

    LoRA r=16 on every linear layer, 4 epochs             33.7%
    the same, 12 epochs (early stopping ends it at ~5)    40.5%
    r=64, 12 epochs                                       35.2%
    + embedding and output layer trained in full, 4 ep.   43.8%
    + embedding and output layer, 12 epochs               52.8%

Rank was not what held the adapter back; the layers LoRA does not touch were, and so was the number of
optimizer steps a few hundred rows give.

1. **Embedding and output layer** (`train.modules_to_save = "auto"`). A low-rank update of the attention
   and MLP weights cannot move what a token means on the way in, nor which token the last layer prefers
   on the way out. For a small model whose vocabulary was fitted to the customer's own text, teaching a
   new intent boundary means moving exactly those rows, so they are trained in full and saved with the
   adapter (PEFT `modules_to_save`). The rule takes them in when together they hold at most
   `train.full_train_max_params` parameters (default 20M). That line keeps every pretrained LLM out: the
   smallest common ones hold far more there (Qwen2.5-0.5B: 151,936 x 896 = 136M in its embedding alone),
   their embeddings are already good, and copying them would make each adapter hundreds of MB. Serving
   through vLLM's LoRA support does not load such modules: set `modules_to_save = []` there.

2. **Epochs for small snapshots** (`train.min_steps`, `train.max_epochs`). A snapshot of a few hundred
   rows gives a few dozen optimizer steps per epoch; `train.epochs` of them is too few to move the
   adapter, and the learning-rate schedule is stretched over the run's length. So the run gets enough
   epochs for at least `min_steps` optimizer steps (never more than `max_epochs`), and early stopping on
   the held-out split (on by default) keeps the best checkpoint and ends the run once the held-out loss
   stops falling, which is what guards a small snapshot against over-fitting, not a low epoch count.

`resolve` turns the settings into the concrete values before the job id is derived, so the job records
what it trained with, and `notes` says what each rule decided.
"""

from __future__ import annotations

import math
from pathlib import Path

from flywheel.settings_sections import TrainSettings


def resolve(train: TrainSettings, base_model: Path, train_rows: int) -> tuple[TrainSettings, list[str]]:
    """The settings with "auto" modules and the epoch count decided, and one note per decision."""
    notes: list[str] = []
    modules = train.modules_to_save
    if modules == "auto":
        modules, note = auto_modules(base_model, train.full_train_max_params)
        notes.append(note)
    epochs = train.epochs
    steps_per_epoch = math.ceil(max(train_rows, 1) / (train.batch_size * train.grad_accum))
    if train.min_steps and steps_per_epoch * epochs < train.min_steps:
        wanted = math.ceil(train.min_steps / steps_per_epoch)
        epochs = float(min(max(wanted, epochs), max(train.max_epochs, epochs)))
        notes.append(
            f"epochs: {train_rows} train rows give {steps_per_epoch} steps per epoch; {epochs:g} epochs "
            f"(train.epochs {train.epochs:g}) for at least train.min_steps {train.min_steps} steps, at most train.max_epochs {train.max_epochs:g}"
        )
    return train.model_copy(update={"modules_to_save": list(modules), "epochs": epochs}), notes


def auto_modules(base_model: Path, max_params: int) -> tuple[list[str], str]:
    """The input embedding's and output layer's module names when they hold at most `max_params`."""
    names, params = embedding_layers(base_model)
    if not names:
        return [], "modules_to_save auto: the model has no separate embedding or output layer to train"
    if params > max_params:
        return (
            [],
            f"modules_to_save auto: none; {'+'.join(names)} hold {params:,} parameters, over train.full_train_max_params {max_params:,}",
        )
    return (
        names,
        f"modules_to_save auto: {'+'.join(names)} trained in full ({params:,} parameters, at most train.full_train_max_params {max_params:,})",
    )


def embedding_layers(base_model: Path) -> tuple[list[str], int]:
    """Names (as PEFT matches them: the last part of the module path) of the model's input embedding
    and output layer, and how many parameters the adapter would copy for them. The model is built on
    the meta device from its config: no weights are read, so this costs nothing even for a large model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names: list[str] = []
    params = 0
    for path, module in model.named_modules():
        if any(module is m for m in wanted) and path:
            names.append(path.rsplit(".", 1)[-1])
            # A tied output layer shares the embedding's weight, but the adapter saves a copy of each.
            params += sum(p.numel() for p in module.parameters())
    return names, params
