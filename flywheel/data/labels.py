"""Human labels: what a person says the right intent (and, optionally, the right answer) of a failure is.

A label becomes the failure's `Reference`: the corrector answers for the labelled intent and the
verifier checks against it. Every label row counts against the labelling budget that active learning
spends (`count_labels`), so relabelling a failure costs another label.

Label files are JSONL, one object per line:
    {"failure_id": "f-...", "intent": "card_arrival", "answer": "optional text", "by": "optional name"}
A "text" key (the user's request, as the label queue of flywheel.data.labelling writes it) is read and
ignored, so a person can answer the queue file in place. A bad line is reported with its line number
and the good lines are still stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from sqlalchemy import Connection, func, select

from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import Record, Reference, utcnow
from flywheel.store.db import Store
from flywheel.store.schema import failures, labels


class Label(Record):
    """What one label says. Unknown keys are refused so that a typo ("intnet") is not silently lost."""

    intent: str = Field(min_length=1, max_length=200)
    answer: str | None = Field(None, min_length=1)


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


def _existing_ids(conn: Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found.update(conn.execute(select(failures.c.id).where(failures.c.id.in_(chunk))).scalars())
    return found


def _insert(conn: Connection, failure_id: str, label: Label, labeller: str) -> int:
    row = conn.execute(
        labels.insert()
        .values(failure_id=failure_id, label=label.model_dump(exclude_none=True), labeller=labeller, created_at=utcnow())
        .returning(labels.c.id)
    ).first()
    return int(row.id)


def add_label(store: Store, failure_id: str, label: dict[str, Any] | Label, labeller: str) -> int:
    """Store one label for a failure; returns the label's id. Unknown failure: NotFoundError."""
    checked = _check_label(label, f"label for {failure_id}")
    if not labeller.strip():
        raise UserInputError(f"label for {failure_id}: the labeller's name is empty")
    with store.begin() as conn:
        if not _existing_ids(conn, [failure_id]):
            raise NotFoundError(f"no failure with id {failure_id!r}")
        return _insert(conn, failure_id, checked, labeller)


def add_labels_from_file(store: Store, path: Path, labeller: str) -> LabelFileResult:
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
        obj.pop("text", None)  # the request as the label queue showed it (data.labelling.QueueLabeller)
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
        known = _existing_ids(conn, sorted({p[1] for p in parsed}))
        added = 0
        for number, failure_id, label, by in parsed:
            if failure_id not in known:
                errors.append((number, f"no failure with id {failure_id!r}"))
                continue
            _insert(conn, failure_id, label, by)
            added += 1
    return LabelFileResult(added=added, lines=lines, errors=[f"{name}:{n}: {problem}" for n, problem in sorted(errors)])


def latest_label(conn: Connection, failure_id: str) -> Reference | None:
    """The newest label of a failure as a Reference (source "label:<labeller>"), or None."""
    row = conn.execute(select(labels).where(labels.c.failure_id == failure_id).order_by(labels.c.id.desc()).limit(1)).first()
    if row is None:
        return None
    label = Label.model_validate(row.label)
    return Reference(intent=label.intent, answer=label.answer, source=f"label:{row.labeller}")


def latest_labels(conn: Connection, failure_ids: list[str]) -> dict[str, Reference]:
    """The newest label of each of many failures (those without a label are absent)."""
    out: dict[str, Reference] = {}
    for start in range(0, len(failure_ids), 500):
        chunk = failure_ids[start : start + 500]
        newest = (
            select(func.max(labels.c.id).label("lid")).where(labels.c.failure_id.in_(chunk)).group_by(labels.c.failure_id).subquery()
        )
        for row in conn.execute(select(labels).join(newest, labels.c.id == newest.c.lid)):
            label = Label.model_validate(row.label)
            out[row.failure_id] = Reference(intent=label.intent, answer=label.answer, source=f"label:{row.labeller}")
    return out


def count_labels(store: Store) -> int:
    """How many labels people have given: what the labelling budget is spent on."""
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(labels)).scalar_one())
