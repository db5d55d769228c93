"""A demo pack: an intent dataset folder and what the demo needs to simulate production on it.

The folder holds `train.csv` and `test.csv` (columns `text,category`) and `categories.json` (the intent
names). Optional: `kb.jsonl` (approved replies per intent, policies; see flywheel.data.kb) and `demo.toml`
(policies, gate settings, the production model's simulated weaknesses, the simulated users' behaviour). Without them
the demo has no knowledge base (corrections come from the labels and stable production replies) and uses the
defaults below, so any intent dataset in this shape runs with `flywheel demo --data DIR`. Nothing here knows
Banking77.

Train rows whose text repeats a test row (after the same normalisation the test-set filter uses) are dropped
on load: public intent sets carry such repeats (Banking77 has one), and the promise is that nothing the loop
or the simulated production trains on comes from test.csv.
"""

from __future__ import annotations

import csv
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flywheel.errors import UserInputError
from flywheel.trainer.samples import normalise_text


class ProductionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    head_intents_share: float = Field(0.3, gt=0, le=1)
    head_examples: int = Field(40, ge=1)
    tail_examples: tuple[int, int] = (2, 8)
    promise_intents: list[str] = []
    promise_text: str = "We guarantee a full refund within 24 hours."


class SignalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    wrong_escalate: float = 0.45
    wrong_followups: float = 0.35
    wrong_thumbs_down: float = 0.5
    wrong_silent: float = 0.1
    policy_qa_reject: float = 0.85
    right_false_alarm: float = 0.04


class Row(BaseModel):
    text: str
    intent: str
    line: int


class DemoPack(BaseModel):
    folder: Path
    intents: list[str]
    train: list[Row]
    test: list[Row]
    train_repeats_dropped: int = 0
    kb_file: Path | None
    policies: dict[str, Any]
    gate: dict[str, Any]
    production: ProductionConfig
    signals: SignalConfig

    @property
    def name(self) -> str:
        return self.folder.name


def default_pack_dir() -> Path:
    return Path(str(resources.files("flywheel.demo").joinpath("packs/banking77")))


def load_pack(folder: Path | None = None) -> DemoPack:
    folder = (folder or default_pack_dir()).resolve()
    if not folder.is_dir():
        raise UserInputError(f"--data {folder}: not a folder")
    intents = _read_categories(folder / "categories.json")
    known = set(intents)
    config = _read_toml(folder / "demo.toml")
    production = ProductionConfig.model_validate(config.get("production", {}))
    unknown = [i for i in production.promise_intents if i not in known]
    if unknown:
        raise UserInputError(f"{folder / 'demo.toml'}: production.promise_intents names unknown intents {unknown}")
    train, test = _read_rows(folder / "train.csv", known), _read_rows(folder / "test.csv", known)
    test_texts = {normalise_text(r.text) for r in test}
    kept = [r for r in train if normalise_text(r.text) not in test_texts]
    return DemoPack(
        folder=folder,
        intents=intents,
        train=kept,
        test=test,
        train_repeats_dropped=len(train) - len(kept),
        kb_file=(folder / "kb.jsonl") if (folder / "kb.jsonl").is_file() else None,
        policies=config.get("policies", {}),
        gate=config.get("gate", {}),
        production=production,
        signals=SignalConfig.model_validate(config.get("signals", {})),
    )


def _read_categories(path: Path) -> list[str]:
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"{path}: missing (a JSON list of intent names)") from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not JSON: {exc}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserInputError(f"{path}: expected a non-empty JSON list of intent names")
    return names


def _read_rows(path: Path, known: set[str]) -> list[Row]:
    if not path.is_file():
        raise UserInputError(f"{path}: missing (CSV with columns text,category)")
    rows: list[Row] = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"text", "category"} <= set(reader.fieldnames):
            raise UserInputError(f"{path}: expected the columns text,category, found {reader.fieldnames}")
        for line, record in enumerate(reader, start=2):
            text, intent = (record.get("text") or "").strip(), record.get("category") or ""
            if not text:
                raise UserInputError(f"{path}:{line}: empty text")
            if intent not in known:
                raise UserInputError(f"{path}:{line}: category {intent!r} is not in categories.json")
            rows.append(Row(text=text, intent=intent, line=line))
    return rows


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML: {exc}") from None


def approved_replies(pack: DemoPack) -> dict[str, str]:
    """The approved answer per intent: from kb.jsonl when the pack has one, else a generic reply."""
    answers: dict[str, str] = {}
    if pack.kb_file is not None:
        for line in pack.kb_file.read_text(encoding="utf-8").splitlines():
            doc = json.loads(line)
            if doc.get("kind") == "approved_response" and doc.get("intent"):
                answers[doc["intent"]] = doc["text"]
    for intent in pack.intents:
        if intent not in answers:
            readable = intent.replace("_", " ").strip(" ?")
            answers[intent] = json.dumps({"intent": intent, "reply": f"I can help with {readable}. Here is what to do next in the app."})
    return answers


def output_schema(pack: DemoPack) -> dict[str, Any]:
    """The JSON schema every answer must follow: one object with a known intent and a reply."""
    return {
        "type": "object",
        "properties": {"intent": {"type": "string", "enum": pack.intents}, "reply": {"type": "string", "minLength": 1}},
        "required": ["intent", "reply"],
        "additionalProperties": False,
    }
