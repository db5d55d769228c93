"""How the eval runner gets a model's answers: a local model in this process, or Ray tasks over batches.

`LocalGenerate` runs the base model plus LoRA adapter here. With train.launcher "ray" (and
ray.batch_stages), `DistributedGenerate` sends batches of conversations to the executor
(flywheel.executor): each task loads the same base model and adapter once per worker process and answers
greedily, so the answers are the ones the local path gives (tests/test_ray.py compares them). The model
folders must be at the same paths on the cluster's nodes (a shared filesystem, or ray.runtime_env).
First-token latency is measured only locally: across tasks it would time the queue, not the model.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from flywheel.evals.report import ModelRef
from flywheel.evals.timing import FirstTokenProbe
from flywheel.executor import Executor, batches, executor_for
from flywheel.settings import Settings

# What a model hands back for one conversation: plain text, a full assistant message (with tool
# calls), or an object with a `.text` (and maybe `.tool_calls`, `.tokens`) such as
# inference.local_model.Generation. A generate function may also carry `first_token_s`: the time to
# the first token of its last call (`LocalGenerate` does), for the report's timing, and `chunk_size`:
# how many conversations the runner should hand it per call.
Answer = Any
GenerateFn = Callable[[list[list[dict[str, Any]]]], Sequence[Answer]]
ModelLoader = Callable[[ModelRef, Settings], tuple[GenerateFn, Callable[[], None]]]


class LocalGenerate:
    """A generate function over a local base model plus optional LoRA adapter. `first_token_s` is the
    time its last call took to the first generated token (a forward hook: flywheel.evals.timing)."""

    def __init__(self, ref: ModelRef, settings: Settings):
        from flywheel.inference.local_model import LocalModel

        self.model: Any = LocalModel(ref.base_model, ref.adapter_path)
        self.settings = settings
        inner: Any = self.model.model
        # the transformers model whose forward passes generate() runs (a PeftModel wraps it)
        self.probe = FirstTokenProbe(inner.get_base_model() if hasattr(inner, "get_base_model") else inner)
        self.first_token_s: float | None = None

    def __call__(self, conversations: list[list[dict[str, Any]]]) -> list[Any]:
        self.probe.arm()
        eval_settings = self.settings.eval
        answers = list(self.model.generate(conversations, max_new_tokens=eval_settings.max_new_tokens, batch_size=eval_settings.batch_size))
        self.first_token_s = self.probe.latency()
        return answers

    def release(self) -> None:
        self.probe.remove()
        self.model = None
        gc.collect()


def local_generate_fn(ref: ModelRef, settings: Settings) -> tuple[GenerateFn, Callable[[], None]]:
    """A generate function over a local model (`LocalGenerate`), and a function that frees it (two models
    of a real size do not fit side by side on many machines)."""
    generate = LocalGenerate(ref, settings)
    return generate, generate.release


# --- on the executor's workers ---------------------------------------------------------------------------------

# The model a worker process loaded last, kept for the next batch of the same model; one at a time, since
# two models of a real size do not fit side by side on many machines.
_loaded: dict[tuple[str, str | None], Any] = {}
_loading = threading.Lock()


def generate_batch(
    base_model: str, adapter_path: str | None, max_new_tokens: int, batch_size: int, conversations: Sequence[Any]
) -> list[Any]:
    """Answer one batch of conversations: the unit of work of a task (module-level, so Ray sends it by reference)."""
    from flywheel.inference.local_model import LocalModel

    key = (base_model, adapter_path)
    with _loading:
        model = _loaded.get(key)
        if model is None:
            _loaded.clear()
            gc.collect()
            model = _loaded[key] = LocalModel(base_model, adapter_path)
    return list(model.generate(list(conversations), max_new_tokens=max_new_tokens, batch_size=batch_size))


class DistributedGenerate:
    """A generate function whose batches run as the executor's tasks: the runner hands it `chunk_size`
    conversations per call (ray.batch_rows), which go out in tasks of eval.batch_size each."""

    first_token_s: float | None = None

    def __init__(self, ref: ModelRef, settings: Settings, executor: Executor):
        self.executor = executor
        self.chunk_size = settings.ray.batch_rows
        self.task_rows = settings.eval.batch_size
        self.task = partial(generate_batch, ref.base_model, ref.adapter_path, settings.eval.max_new_tokens, settings.eval.batch_size)

    def __call__(self, conversations: list[list[dict[str, Any]]]) -> list[Any]:
        parts = self.executor.map(self.task, batches(conversations, self.task_rows))
        return [answer for part in parts for answer in part]

    def release(self) -> None:
        """Nothing to free here: each worker keeps one model and replaces it when the next one arrives."""


def model_loader(settings: Settings) -> ModelLoader:
    """The default way to get a model's answers for these settings: Ray tasks when the batch stages run
    on Ray, else a local model."""
    executor = executor_for(settings)
    if not executor.distributed:
        return local_generate_fn

    def distributed(ref: ModelRef, loader_settings: Settings) -> tuple[GenerateFn, Callable[[], None]]:
        generate = DistributedGenerate(ref, loader_settings, executor)
        return generate, generate.release

    return distributed
