"""A dataset snapshot folder as a training run reads it: split files, manifest, content hash, examples.

Snapshot rows (train.jsonl and heldout.jsonl, or .parquet; manifest.json beside them):
    SFT  {"messages": [..., {"role": "assistant", "content": "the corrected answer"}], "weight": 1.5, ...}
    DPO  {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...], "weight": 1.0, ...}
KTO reads either shape (unpaired good and bad answers, TRL's KTOTrainer): an SFT row's answer and a DPO row's
chosen answer are desirable, a DPO row's rejected answer undesirable.
Every example also carries the row's `intent` and `tier` (META_KEYS), which the curriculum and the EWC anchor
read; flywheel.trainer.recipes takes them off before the examples reach TRL.
SFT trains on the final assistant turn only: earlier assistant turns are production answers that may be
the very failures being corrected, so they are context, not targets. A row that does not fit is skipped
(`SkippedRow`: its file, line and reason, also logged); flywheel.trainer.recipes records them in
lineage.json and fails only when no row is left.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flywheel.errors import UserInputError
from flywheel.store.vectors import sha256_file

log = logging.getLogger("flywheel.train")

SPLITS = ("train", "heldout")
METHODS = ("sft", "dpo", "kto")
META_KEYS = ("intent", "tier")
ROLES = {"system", "user", "assistant", "tool"}


class SkippedRow(BaseModel):
    where: str  # "train.jsonl:12"
    why: str


# --- the folder --------------------------------------------------------------------------------------------


def split_file(dataset_dir: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".parquet"):
        path = dataset_dir / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def read_manifest(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def dataset_content_hash(dataset_dir: Path) -> str:
    """sha256 over the bytes of the split files, so a job id follows the data, not the folder's name."""
    import hashlib

    digest = hashlib.sha256()
    for split in SPLITS:
        path = split_file(dataset_dir, split)
        digest.update(f"{split}:{path.name if path else '-'}:".encode())
        if path is not None:
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


# --- reading rows ------------------------------------------------------------------------------------------


def _read_split(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs; a line that is not JSON becomes (where, None) so it is reported, not fatal."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path.name}:{i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    rows: list[tuple[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{number}", json.loads(line)))
            except json.JSONDecodeError:
                rows.append((f"{path.name}:{number}", None))
    return rows


def _message(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        raise ValueError(f"a message is not an object with a role in {sorted(ROLES)}")
    content = raw.get("content") or ""
    if not isinstance(content, str):
        raise ValueError("a message content is not text")
    # Role and content only, as LocalModel.render gives the chat template at evaluation and in the gateway:
    # a tool call turn trains as the empty turn it is served as, so the adapter learns on the prompts it
    # will see (tool calls appended here as JSON text made every prompt with a tool call one it never saw).
    return {"role": raw["role"], "content": content}


def _weight(row: dict[str, Any]) -> float:
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight {weight!r} is not a non-negative number")
    return float(weight)


def _meta(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] if isinstance(row.get(key), str) else None for key in META_KEYS}


def sft_example(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError("no messages list")
    messages = [_message(m, where) for m in row["messages"]]
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise ValueError("messages must end with a non-empty assistant answer after at least one other message")
    return {"prompt": messages[:-1], "completion": messages[-1:], "weight": _weight(row), **_meta(row)}


def dpo_example(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), list) or not row["prompt"]:
        raise ValueError("no prompt messages list")
    prompt = [_message(m, where) for m in row["prompt"]]
    answers = {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        if not isinstance(value, list) or len(value) != 1:
            raise ValueError(f"{key} must be one assistant message")
        message = _message(value[0], where)
        if message["role"] != "assistant" or not message["content"].strip():
            raise ValueError(f"{key} must be a non-empty assistant message")
        answers[key] = [message]
    if answers["chosen"][0]["content"] == answers["rejected"][0]["content"]:
        raise ValueError("chosen and rejected are the same answer")
    return {"prompt": prompt, **answers, "weight": _weight(row), **_meta(row)}


def kto_examples(row: Any, where: str) -> list[dict[str, Any]]:
    """An SFT row: its answer, desirable. A DPO row: its chosen answer desirable, its rejected one undesirable."""
    if isinstance(row, dict) and "messages" in row:
        good = sft_example(row, where)
        return [{"prompt": good["prompt"], "completion": good["completion"], "label": True, "weight": good["weight"], **_meta(row)}]
    pair = dpo_example(row, where)
    common = {"prompt": pair["prompt"], "weight": pair["weight"], **_meta(row)}
    return [{**common, "completion": pair["chosen"], "label": True}, {**common, "completion": pair["rejected"], "label": False}]


def load_examples(dataset_dir: Path, split: str, method: str) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    path = split_file(dataset_dir, split)
    if path is None:
        return [], []
    if method not in METHODS:
        raise UserInputError(f"training method {method!r} is not one of {', '.join(METHODS)}")
    convert = {
        "sft": lambda row, where: [sft_example(row, where)],
        "dpo": lambda row, where: [dpo_example(row, where)],
        "kto": kto_examples,
    }[method]
    examples: list[dict[str, Any]] = []
    skipped: list[SkippedRow] = []
    for where, row in _read_split(path):
        try:
            if row is None:
                raise ValueError("not valid JSON")
            examples.extend(convert(row, where))
        except ValueError as exc:
            skipped.append(SkippedRow(where=where, why=str(exc)))
            log.warning("skipping %s: %s", where, exc)
    return examples, skipped
