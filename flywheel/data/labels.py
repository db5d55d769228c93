"""Human labels: a person's correction of a failure.

A label says the right intent and, optionally, the right answer; or it says the answer was fine
(`"fine": true`). It becomes the failure's `Reference`:

- the judge compares the answer with it (an intent that differs is `wrong_intent`, with the label as
  provenance; a "fine" label makes the failure `not_failure`);
- the corrector uses the person's answer when there is one, and otherwise builds the target for the
  labelled intent from what the project knows (flywheel.data.replies);
- a "fine" answer becomes a positive training sample (flywheel.trainer.samples).

Every label row counts against the labelling budget that active learning spends (`count_labels`), so
relabelling a failure costs another label.

Label files are JSONL, one object per line:
    {"failure_id": "f-...", "intent": "card_arrival", "answer": "optional text", "by": "optional name"}
    {"failure_id": "f-...", "fine": true}
A "text" or "logged_answer" key (what the label queue of flywheel.data.labelling writes) is read and
ignored, so a person can answer the queue file in place. A bad line (broken JSON, an unknown intent, a
failure that does not exist) is reported with its file and line number and the good lines are still
stored.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from sqlalchemy import Connection

from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import FailureView, Record, Reference
from flywheel.settings import Settings
from flywheel.store import failures as failure_repo
from flywheel.store import labels as label_repo
from flywheel.store import versions as version_store
from flywheel.store.db import Store

QUEUE_KEYS = ("text", "logged_answer")  # what the label queue shows the person; not part of a label


class Label(Record):
    """What one label says. Unknown keys are refused so that a typo ("intnet") is not silently lost."""

    intent: str | None = Field(None, min_length=1, max_length=200)
    answer: str | None = Field(None, min_length=1)
    fine: bool = False  # the person says the logged answer was right as it stands

    @model_validator(mode="after")
    def _says_something(self) -> Label:
        if not self.fine and self.intent is None:
            raise ValueError('a label names the right "intent" (optionally an "answer"), or says "fine": true')
        if self.fine and self.answer is not None:
            raise ValueError('a "fine" label keeps the logged answer; give an "answer" only to correct it')
        return self

    def reference(self, labeller: str) -> Reference:
        return Reference(intent=self.intent, answer=self.answer, fine=self.fine, source=f"label:{labeller}")


def known_intents(settings: Settings, conn: Connection) -> set[str] | None:
    """The intents a label may name: the output schema's enum for "intent" when it has one, else every
    intent seen in the logs or in earlier labels. None: nothing is known yet, so nothing is checked."""
    schema = settings.policies.output_schema or {}
    enum = ((schema.get("properties") or {}).get("intent") or {}).get("enum")
    if isinstance(enum, list) and enum:
        return {str(v) for v in enum}
    return label_repo.seen_intents(conn) or None


def _check_intent(label: Label, known: set[str] | None) -> str | None:
    """Why the label's intent is refused, or None."""
    if label.intent is None or known is None or label.intent in known:
        return None
    close = difflib.get_close_matches(label.intent, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" ({len(known)} known intents; `flywheel failures counts` lists them)"
    return f"unknown intent {label.intent!r}{hint}"


class LabelFileResult(Record):
    added: int
    lines: int
    errors: list[str] = []  # "labels.jsonl:3: ..." one per rejected line


def _check_label(label: dict[str, Any] | Label, where: str) -> Label:
    if isinstance(label, Label):
        return label
    if not isinstance(label, dict):
        problem = f"a label is a JSON object, got {type(label).__name__}"
        raise UserInputError(f"{where}: {problem}" if where else problem)
    try:
        return Label.model_validate(label)
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'label'}: {err['msg']}" for err in exc.errors())
        raise UserInputError(f"{where}: {problem}" if where else problem) from None


def _insert(conn: Connection, failure_id: str, label: Label, labeller: str) -> int:
    return label_repo.insert(conn, failure_id, label.model_dump(exclude_none=True), labeller)


def add_label(store: Store, failure_id: str, label: dict[str, Any] | Label, labeller: str, *, settings: Settings | None = None) -> int:
    """Store one label for a failure; returns the label's id. Unknown failure: NotFoundError. With
    `settings`, an intent the project does not know (`known_intents`) is refused (UserInputError)."""
    checked = _check_label(label, f"label for {failure_id}")
    if not labeller.strip():
        raise UserInputError(f"label for {failure_id}: the labeller's name is empty")
    with store.begin() as conn:
        if not failure_repo.existing_ids(conn, [failure_id]):
            raise NotFoundError(f"no failure with id {failure_id!r}")
        problem = _check_intent(checked, known_intents(settings, conn)) if settings is not None else None
        if problem:
            raise UserInputError(f"label for {failure_id}: {problem}")
        return _insert(conn, failure_id, checked, labeller)


def add_labels_from_file(store: Store, path: Path, labeller: str, *, settings: Settings | None = None) -> LabelFileResult:
    """Store every good line of a JSONL label file; bad lines come back in `errors`, one per line.

    A line may name its own labeller with "by"; otherwise `labeller` is used.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read label file {path}: {exc}") from None
    name = Path(path).name
    parsed: list[tuple[int, str, Label, str]] = []
    errors: list[tuple[int, str]] = []  # (line number, problem)
    lines = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        lines += 1
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(obj, dict):
            errors.append((number, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        for key in QUEUE_KEYS:  # what the label queue showed (data.labelling.QueueLabeller)
            obj.pop(key, None)
        failure_id = obj.pop("failure_id", None)
        by = obj.pop("by", None) or labeller
        if not isinstance(failure_id, str) or not failure_id:
            errors.append((number, "failure_id is missing"))
            continue
        if not isinstance(by, str) or not by.strip():
            errors.append((number, "by must be a non-empty name"))
            continue
        try:
            parsed.append((number, failure_id, _check_label(obj, ""), by))
        except UserInputError as exc:
            errors.append((number, str(exc)))
    with store.begin() as conn:
        known = failure_repo.existing_ids(conn, sorted({p[1] for p in parsed}))
        intents = known_intents(settings, conn) if settings is not None else None
        added = 0
        for number, failure_id, label, by in parsed:
            if failure_id not in known:
                errors.append((number, f"no failure with id {failure_id!r}"))
                continue
            problem = _check_intent(label, intents)
            if problem:
                errors.append((number, problem))
                continue
            _insert(conn, failure_id, label, by)
            added += 1
    return LabelFileResult(added=added, lines=lines, errors=[f"{name}:{n}: {problem}" for n, problem in sorted(errors)])


def latest_label(conn: Connection, failure_id: str) -> Reference | None:
    """The newest label of a failure as a Reference (source "label:<labeller>"), or None."""
    found = label_repo.latest(conn, failure_id)
    if found is None:
        return None
    return Label.model_validate(found.label).reference(found.labeller)


def latest_labels(conn: Connection, failure_ids: list[str]) -> dict[str, Reference]:
    """The newest label of each of many failures (those without a label are absent)."""
    return {
        fid: Label.model_validate(found.label).reference(found.labeller) for fid, found in label_repo.latest_many(conn, failure_ids).items()
    }


def failure_view(store: Store, failure_id: str) -> FailureView:
    """What `flywheel failures show` prints: the store's view of the failure (flywheel.store.failures.show)
    with its newest label as the `reference`. Unknown failure: NotFoundError."""
    view = failure_repo.show(store, failure_id)
    with store.engine.connect() as conn:
        return view.model_copy(update={"reference": latest_label(conn, failure_id)})


def count_labels(store: Store) -> int:
    """How many labels people have given, in all."""
    return label_repo.count(store)


def labels_spent(store: Store, settings: Settings) -> int:
    """The labels that count against selection.labelling_budget: with budget_scope "champion" (the
    default) those given since the current champion took over, so each promoted model's failures get a
    budget of their own; with "project" every label ever given."""
    if settings.selection.budget_scope == "project":
        return label_repo.count(store)
    with store.engine.connect() as conn:
        since = version_store.alias_updated_at(conn, "champion")  # None before any champion: every label counts
    return label_repo.count(store, since=since)
