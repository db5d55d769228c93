"""`LocalModel`: a causal LM from a local folder plus named LoRA adapters over it, for inference.

Evals, the gateway, selection and the demo run models through it: greedy generation with per-token
confidence (`Generation`), the log-probability of given answers, and mean-pooled embeddings. Any causal LM
that transformers loads from a local folder with safetensors weights is a base model (resolved and checked
by flywheel.inference.folders); any number of PEFT LoRA adapters are switched by name without reloading the
base (the gateway serves several). Nothing here downloads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from flywheel.errors import InfrastructureError, UserInputError
from flywheel.inference.folders import ADAPTER_WEIGHTS, check_adapter_folder, resolve_base_model
from flywheel.store.vectors import sha256_file

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    class _CausalLM(PreTrainedModel, GenerationMixin):
        """What AutoModelForCausalLM loads: a model with generate() (transformers' own hints do the same)."""


BASE = None  # adapter name meaning "the base model, every adapter off"


class Generation(BaseModel):
    """One greedy answer and how sure the model was of it.

    `top1`, `top2` and `entropy` describe the first `k` generated positions (the selection strategies use
    least-confidence, margin and entropy over the start of an answer, where the model commits)."""

    model_config = ConfigDict(extra="forbid")

    text: str
    tokens: int
    mean_logprob: float
    min_logprob: float
    top1: list[float]  # probability of the most likely token, per position
    top2: list[float]  # probability of the second most likely token, per position
    entropy: list[float]  # nats, per position

    @property
    def least_confidence(self) -> float:
        return 1.0 - float(np.mean(self.top1)) if self.top1 else 1.0

    @property
    def margin(self) -> float:
        return float(np.mean(np.subtract(self.top1, self.top2))) if self.top1 else 0.0

    @property
    def mean_entropy(self) -> float:
        return float(np.mean(self.entropy)) if self.entropy else 0.0


class _Current:
    def __repr__(self) -> str:
        return "CURRENT"


CURRENT: Any = _Current()  # default `adapter` argument: whichever adapter is active


class LocalModel:
    """A causal LM from a local folder plus named LoRA adapters over it, for greedy generation, scoring and
    embeddings. Methods are serialised by a lock: switching an adapter and generating is one step."""

    def __init__(
        self,
        base_path: Path | str,
        adapter_path: Path | str | None = None,
        *,
        adapter_name: str = "default",
        device: str | None = None,
        confidence_positions: int = 8,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_path = resolve_base_model(base_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        self.confidence_positions = confidence_positions
        self._lock = threading.RLock()
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(self.base_path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(self.base_path), local_files_only=True, use_safetensors=True, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise InfrastructureError(f"cannot load the model at {self.base_path}: {str(exc).splitlines()[0]}") from exc
        if self.tokenizer.chat_template is None:
            raise UserInputError(f"{self.base_path}: the tokenizer has no chat template")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model: _CausalLM | PeftModel = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers wraps .to with functools.wraps, whose hints drop the bound self
        self.adapters: dict[str, str] = {}  # name -> folder
        self.adapter_sha256: dict[str, str] = {}  # name -> sha256 of its weights
        self.active: str | None = BASE
        if adapter_path is not None:
            self.load_adapter(adapter_name, adapter_path)
            self.set_adapter(adapter_name)

    # --- adapters ---------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path | str, expected_sha256: str | None = None) -> None:
        """Add a LoRA adapter under `name`, replacing what the name held (a no-op when it holds these weights)."""
        from peft import PeftModel

        folder = check_adapter_folder(path, expected_sha256)
        digest = expected_sha256 or sha256_file(folder / ADAPTER_WEIGHTS)
        with self._lock:
            if self.adapters.get(name) == str(folder) and self.adapter_sha256.get(name) == digest:
                return
            if name in self.adapters:
                self.model.delete_adapter(name)
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False)
            except (OSError, ValueError, RuntimeError) as exc:
                raise UserInputError(f"cannot load the adapter at {folder}: {str(exc).splitlines()[0]}") from exc
            self.model.eval()
            self.adapters[name] = str(folder)
            self.adapter_sha256[name] = digest
            # PeftModel activates the first adapter it loads; keep whatever was active before.
            self._activate(self.active)

    def remove_adapter(self, name: str) -> None:
        """Drop a loaded adapter (a retired version); serving falls back to the base if it was active."""
        with self._lock:
            if name not in self.adapters:
                return
            if len(self.adapters) == 1:
                # PEFT cannot hold zero adapters: take the LoRA layers out and serve the plain base again.
                from peft import PeftModel

                assert isinstance(self.model, PeftModel)  # an adapter is loaded, so the model is wrapped
                self.model = self.model.unload().eval()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name], self.adapter_sha256[name]
            if self.active == name:
                self.active = BASE
            self._activate(self.active)

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter; None serves the base model."""
        with self._lock:
            if name is not None and name not in self.adapters:
                raise UserInputError(f"no adapter named {name!r} is loaded (loaded: {sorted(self.adapters) or 'none'})")
            self._activate(name)
            self.active = name

    def _activate(self, name: str | None) -> None:
        if name is not None:
            self.model.set_adapter(name)

    @contextmanager
    def _using(self, adapter: Any) -> Iterator[None]:
        name = self.active if adapter is CURRENT else adapter
        with self._lock:
            if name is None and self.adapters:
                from peft import PeftModel

                assert isinstance(self.model, PeftModel)  # an adapter is loaded, so the model is wrapped
                with self.model.disable_adapter():
                    yield
                return
            if name is not None:
                if name not in self.adapters:
                    raise UserInputError(f"no adapter named {name!r} is loaded (loaded: {sorted(self.adapters) or 'none'})")
                self.model.set_adapter(name)
            try:
                yield
            finally:
                self._activate(self.active)

    # --- inference --------------------------------------------------------------------------------------

    def render(self, conversation: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        messages = [{"role": m["role"], "content": m.get("content") or ""} for m in conversation]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert isinstance(text, str)  # tokenize=False renders text
        return text

    def generate(
        self, conversations: Sequence[Sequence[dict[str, Any]]], max_new_tokens: int = 64, batch_size: int = 8, *, adapter: Any = CURRENT
    ) -> list[Generation]:
        """Greedy answers to each conversation (the next assistant turn), in order."""
        import torch

        results: list[Generation] = []
        eos_ids = self._eos_ids()
        with self._using(adapter), torch.inference_mode():
            for start in range(0, len(conversations), batch_size):
                batch = conversations[start : start + batch_size]
                texts = [self.render(c, add_generation_prompt=True) for c in batch]
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                out = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=eos_ids,
                )
                new_tokens = out.sequences[:, enc["input_ids"].shape[1] :]
                logits = torch.stack(out.logits, dim=1).float()  # (batch, steps, vocab)
                logprobs = torch.log_softmax(logits, dim=-1)
                for row in range(new_tokens.shape[0]):
                    results.append(self._summarise(new_tokens[row], logprobs[row], eos_ids))
        return results

    def _summarise(self, tokens: torch.Tensor, logprobs: torch.Tensor, eos_ids: list[int]) -> Generation:
        import torch

        ids = tokens.tolist()
        length = len(ids)
        for position, token in enumerate(ids):
            if token in eos_ids:
                length = position + 1  # the stop token was generated: it counts, what follows is padding
                break
        chosen = logprobs[:length].gather(1, tokens[:length, None]).squeeze(1)
        k = min(self.confidence_positions, length)
        probs = logprobs[:k].exp()
        top = torch.topk(probs, k=2, dim=-1).values
        entropy = -(probs * logprobs[:k]).sum(dim=-1)
        text_ids = [t for t in ids[:length] if t not in eos_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return Generation(
            text=text.strip(),
            tokens=length,
            mean_logprob=float(chosen.mean()) if length else 0.0,
            min_logprob=float(chosen.min()) if length else 0.0,
            top1=[float(v) for v in top[:, 0]],
            top2=[float(v) for v in top[:, 1]],
            entropy=[float(v) for v in entropy],
        )

    def sequence_logprob(
        self, conversations: Sequence[Sequence[dict[str, Any]]], answers: Sequence[str], batch_size: int = 8, *, adapter: Any = CURRENT
    ) -> list[float]:
        """Total log-probability (nats) of each answer, with its end-of-turn token, as the next assistant turn."""
        import torch

        if len(conversations) != len(answers):
            raise UserInputError(f"{len(conversations)} conversations but {len(answers)} answers")
        sequences: list[tuple[list[int], int]] = []
        for conversation, answer in zip(conversations, answers, strict=True):
            prompt = self.tokenizer(self.render(conversation, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            full_text = self.render([*conversation, {"role": "assistant", "content": answer}], add_generation_prompt=False)
            full = self.tokenizer(full_text, add_special_tokens=False)["input_ids"]
            start = _common_prefix(prompt, full)
            # Score through the end-of-turn token; what the template adds after it (a newline) is not the answer.
            end = _last_index(full, self._eos_ids(), after=start)
            sequences.append((full[: end + 1], start))
        totals: list[float] = []
        pad = self.tokenizer.pad_token_id
        with self._using(adapter), torch.inference_mode():
            for begin in range(0, len(sequences), batch_size):
                batch = sequences[begin : begin + batch_size]
                width = max(len(ids) for ids, _ in batch)
                # right padding here: positions line up with the prompt lengths we computed
                input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=self.device)
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=self.device)
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
                logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
                for row, (ids, start) in enumerate(batch):
                    totals.append(float(logprobs[row, max(start - 1, 0) : len(ids) - 1].sum()))
        return totals

    def embed_last_hidden(
        self, conversations: Sequence[Sequence[dict[str, Any]]], batch_size: int = 8, *, adapter: Any = CURRENT
    ) -> np.ndarray:
        """Mean-pooled last hidden state of each rendered conversation: (n, hidden) float32."""
        import torch

        rows: list[np.ndarray] = []
        with self._using(adapter), torch.inference_mode():
            for start in range(0, len(conversations), batch_size):
                texts = [self.render(c, add_generation_prompt=False) for c in conversations[start : start + batch_size]]
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1].float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                rows.append(pooled.cpu().numpy())
        if not rows:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        return np.concatenate(rows).astype(np.float32)

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(config.get_text_config().hidden_size)

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _last_index(ids: Sequence[int], targets: Sequence[int], after: int) -> int:
    for index in range(len(ids) - 1, after - 1, -1):
        if ids[index] in targets:
            return index
    return len(ids) - 1
