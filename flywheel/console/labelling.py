"""The labelling queue in the browser: the failures active learning chose, one at a time.

The queue is the file a run's `request_labels` step leaves for people when no labeller answers at once
(flywheel.tools.labels: `<state>/label_requests.jsonl`, one flywheel.data.labelling.LabelRequest per
line). An item is open while its failure has no label. Each item shows the (PII-scrubbed, as stored at
ingest) conversation, the model's answer, the judge's verdict, the knowledge-base entries the corrector
used and its suggested answer, which the person may take as their answer.

A label is stored with flywheel.data.labels.add_label, labeller = the console user: the same record
`flywheel label` writes, counted against the same budget (`labels_spent`). The same label sent twice by
the same person (a double submit) is stored once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flywheel.console.web import Console
from flywheel.data.kb import search
from flywheel.data.labelling import LabelRequest
from flywheel.data.labels import Label, add_label, failure_view, known_intents, labels_spent, latest_label, latest_labels
from flywheel.errors import UserInputError
from flywheel.records import FailureView, Record

log = logging.getLogger("flywheel.console")

QUEUE_FILE = "label_requests.jsonl"  # what flywheel.tools.labels' QueueLabeller writes under the state folder
KB_COLLECTION = "kb"


class QueueState(Record):
    open: list[LabelRequest]
    done: int  # queued items that have a label now
    budget: int
    spent: int  # labels counted against the budget (selection.budget_scope)


class Item(Record):
    request: LabelRequest
    position: int  # among the open items, from 0
    view: FailureView
    suggestion: str | None  # the corrector's answer, a starting point
    # {"id", "text"} of the knowledge-base entries the corrector used, else the ones nearest to the question
    context: list[dict[str, str]]
    intents: list[str]


def queue_path(console: Console) -> Path:
    return console.settings.state_path / QUEUE_FILE


def read_queue(path: Path) -> list[LabelRequest]:
    """The queued requests in order, each failure once; unreadable lines are skipped (and logged)."""
    if not path.is_file():
        return []
    seen: dict[str, LabelRequest] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            request = LabelRequest.model_validate(json.loads(line))
        except (ValueError, ValidationError) as exc:
            log.warning("%s:%d: not a label request (%s)", path.name, number, str(exc).splitlines()[0])
            continue
        seen.setdefault(request.failure_id, request)
    return list(seen.values())


def queue_state(console: Console) -> QueueState:
    requests = read_queue(queue_path(console))
    store = console.ctx.store
    with store.engine.connect() as conn:
        labelled = set(latest_labels(conn, [r.failure_id for r in requests]))
    return QueueState(
        open=[r for r in requests if r.failure_id not in labelled],
        done=len(labelled),
        budget=console.settings.selection.labelling_budget,
        spent=labels_spent(store, console.settings),
    )


def item_at(console: Console, state: QueueState, position: int) -> Item | None:
    """The open item at `position` (the first one past the end wraps to the start), or None."""
    if not state.open:
        return None
    position = position % len(state.open)
    request = state.open[position]
    view = failure_view(console.ctx.store, request.failure_id)
    correction = view.correction
    with console.ctx.store.engine.connect() as conn:
        intents = sorted(known_intents(console.settings, conn) or {i for i in (request.intent, view.failure.intent) if i})
    return Item(
        request=request,
        position=position,
        view=view,
        suggestion=correction.answer if correction and correction.answer else None,
        context=_kb_context(console, correction.context_ids) if correction and correction.context_ids else _nearest_kb(console, view),
        intents=intents,
    )


def _kb_context(console: Console, ids: list[str]) -> list[dict[str, str]]:
    """The knowledge-base entries among `ids`; ids the index does not hold (similar failures the LLM
    corrector saw) are listed without text. An index that cannot be read leaves the ids only."""
    if not ids:
        return []
    try:
        found = {hit.id: hit.text for hit in console.ctx.index.get(KB_COLLECTION, ids=ids)}
    except Exception as exc:  # the page must show even when the index is not there
        log.warning("knowledge-base context not shown: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        found = {}
    return [{"id": i, "text": found.get(i, "")} for i in ids]


def _nearest_kb(console: Console, view: FailureView, k: int = 3) -> list[dict[str, str]]:
    """No corrector has looked at it yet: the knowledge-base sections nearest to the user's last question,
    as the corrector would retrieve them. No knowledge base (or no index) shows none."""
    question = view.interaction.last_user_text()
    if not question:
        return []
    try:
        return [{"id": hit.id, "text": hit.text} for hit in search(console.ctx.index, question, k=k)]
    except Exception as exc:  # the page must show even when there is no knowledge base or no index
        log.info("no knowledge-base context: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []


def label_from_form(form: dict[str, str]) -> dict[str, Any]:
    """The label the queue's form gives, as `flywheel label` passes it: {"fine": true}, or the intent with
    an optional answer (only the keys given, so both ways in store the same record)."""
    if form.get("fine"):
        return {"fine": True}
    intent = form.get("intent", "").strip()
    if not intent:
        raise UserInputError("choose the right intent (keys 1-9), or say the answer was fine (f)")
    answer = form.get("answer", "").strip()
    return {"intent": intent, **({"answer": answer} if answer else {})}


def store_label(console: Console, user: str, failure_id: str, given: dict[str, Any]) -> str:
    """Store the label (once: the same label by the same person just before is not stored again)."""
    store = console.ctx.store
    label = Label.model_validate(given)
    with store.engine.connect() as conn:
        newest = latest_label(conn, failure_id)
    if newest is not None and newest == label.reference(user):
        return f"{failure_id} was already labelled like this by {user}; nothing added"
    label_id = add_label(store, failure_id, given, user, settings=console.settings)
    said = "fine as answered" if label.fine else f"intent {label.intent}" + (" with an answer" if label.answer else "")
    return f"labelled {failure_id}: {said} (label {label_id})"
