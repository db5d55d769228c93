"""Tool: spend the labelling budget on the failures most worth a person's time (flywheel.data.labelling).

Who answers is the run's labeller (`ctx.labeller`, a flywheel.data.labelling.Labeller): the
demo plugs in one that answers from the dataset's labels. Without one, the requests are queued in
`<state>/label_requests.jsonl` for people, who answer with `flywheel label --file`; the cycle goes on
with what the rule judge can decide alone.
"""

from __future__ import annotations

from typing import Literal

from flywheel.data.labelling import LabellingLog, QueueLabeller, label_failures
from flywheel.data.labels import labels_spent
from flywheel.tools.base import ToolContext, ToolSpec, report_progress

Strategy = Literal["random", "least_confidence", "margin", "entropy", "kcenter", "kmeans", "expected_change", "hybrid"]


def labelling_budget_left(ctx: ToolContext) -> int:
    return max(0, ctx.settings.selection.labelling_budget - labels_spent(ctx.store, ctx.settings))


def request_labels(ctx: ToolContext, strategy: Strategy | None = None) -> LabellingLog:
    """Choose failures for a person to label (active learning within the labelling budget) and store the labels that come back; a label gives the judge the right intent to compare against.

    Args:
        strategy: how to choose: random, least_confidence, margin, entropy, kcenter, kmeans, expected_change or hybrid (default: the selection.strategy setting).
    """
    from flywheel.inference.local_model import LocalModel
    from flywheel.release.registry import resolve

    labeller = ctx.labeller or QueueLabeller(ctx.settings.state_path / "label_requests.jsonl")
    chosen = strategy or ctx.settings.selection.strategy
    model = None
    if chosen != "random" and chosen not in ("kcenter", "kmeans"):
        champion = resolve(ctx.store, "champion")  # the production model's own token probabilities
        model = LocalModel(champion.base_model, champion.adapter_path)
    report_progress(ctx, f"choosing failures to label with {chosen}")
    return label_failures(ctx, labeller, strategy=chosen, model=model)


SPECS = [ToolSpec(request_labels, mutates=True, facts=lambda log: {"labelled": log.labelled})]
