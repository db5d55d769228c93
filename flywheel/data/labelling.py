"""Spending the labelling budget: choose which failures a person labels, ask, store the answers.

Active learning picks the failures (flywheel.trainer.selection: random, uncertainty from the production
model's own token probabilities, diversity over embeddings, hybrid) in rounds, and stops when the
budget is spent or a round stops paying off. What a round "gains" is measured from the labels
themselves: the share of labelled failures whose label disagrees with what production logged, i.e. the
share of picks that exposed a real mistake. A round that finds almost none is budget wasted.

Who answers is a `Labeller`: in the demo, the dataset's own labels; in a deployment, a person through
`flywheel label` (the `QueueLabeller` writes the requests to a file and labels nothing now).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from flywheel.context import Context
from flywheel.data.labels import add_label, labels_spent
from flywheel.errors import NotFoundError, UserInputError
from flywheel.records import Record
from flywheel.trainer.candidates import candidates_from_store, needs_model
from flywheel.trainer.selection import run_rounds


class LabelRequest(Record):
    """What a person is shown. Answered in place (see flywheel.data.labels): keep `intent` or change it,
    add an "answer", or write "fine": true; `text` and `logged_answer` are ignored when read back."""

    failure_id: str
    intent: str | None  # what production logged
    text: str  # the user's request, for the person
    logged_answer: str = ""  # what the model answered


class Labeller(Protocol):
    name: str

    def label(self, requests: Sequence[LabelRequest]) -> dict[str, dict[str, Any]]:
        """Labels for the requests it can answer now: failure id -> {"intent": ...}."""
        ...


class QueueLabeller:
    """Writes label requests to a JSONL file for people; they answer with `flywheel label --file`."""

    name = "queue"

    def __init__(self, path: Path):
        self.path = path

    def label(self, requests: Sequence[LabelRequest]) -> dict[str, dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            for request in requests:
                out.write(request.model_dump_json() + "\n")
        return {}


class LabellingLog(Record):
    strategy: str
    budget: int
    already_used: int
    requested: int
    labelled: int
    rounds: list[dict[str, Any]]
    stop_reason: str
    rejected: list[str] = []  # labels the labeller gave that were refused, with the reason


def label_failures(
    ctx: Context, labeller: Labeller, *, strategy: str | None = None, budget: int | None = None, model: Any = None
) -> LabellingLog:
    """Pick failures by `strategy` within what is left of the labelling budget and get them labelled.

    `model` is the production model (a LocalModel) for the uncertainty strategies; without one they
    cannot run and the error says so.
    """
    settings = ctx.settings.selection
    strategy = strategy or settings.strategy
    total = settings.labelling_budget if budget is None else budget
    used = labels_spent(ctx.store, ctx.settings)
    left = max(0, total - used)
    uses_model = needs_model(strategy) or strategy == "hybrid"
    candidates, labelled, info = candidates_from_store(ctx, model=model if uses_model else None, embedder=ctx.index.embedder)
    stored: dict[str, dict[str, Any]] = {}
    rejected: list[str] = []

    def ask(round_ids: list[str]) -> None:
        requests = [
            LabelRequest(failure_id=i, intent=info[i]["intent"], text=info[i]["text"], logged_answer=info[i].get("answer", ""))
            for i in round_ids
        ]
        for failure_id, label in labeller.label(requests).items():
            try:
                add_label(ctx.store, failure_id, label, labeller.name, settings=ctx.settings)
            except (UserInputError, NotFoundError) as exc:  # one bad answer loses only itself
                rejected.append(str(exc))
                continue
            stored[failure_id] = label

    def exposed_mistake(failure_id: str) -> bool:
        label = stored[failure_id]
        return not label.get("fine") and (label.get("intent") != info[failure_id]["intent"] or bool(label.get("answer")))

    def gain(round_ids: list[str], _so_far: list[str]) -> float:
        answered = [i for i in round_ids if i in stored]
        if not answered:
            return 0.0
        return sum(exposed_mistake(i) for i in answered) / len(answered)

    log = run_rounds(
        candidates,
        strategy,
        left,
        settings.round_size,
        ask,
        gain,
        settings.min_gain,
        seed=settings.seed,
        already_selected=labelled,
        hybrid_step=settings.hybrid_step,
    )
    return LabellingLog(
        strategy=strategy,
        budget=total,
        already_used=used,
        requested=log.spent,
        labelled=len(stored),
        rounds=[
            {"round": r.index, "picked": len(r.ids), "gain": round(r.gain, 4), "uncertainty_share": r.uncertainty_share} for r in log.rounds
        ],
        stop_reason=log.stop_reason,
        rejected=rejected[:20],
    )
