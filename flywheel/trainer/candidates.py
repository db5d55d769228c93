"""Active learning's candidates from the store: the failures nobody labelled yet, with their embeddings and,
when the strategy needs them, the production model's uncertainty features.

    candidates_from_store(ctx, model=..., embedder=...) -> (Candidates, labelled ids, info)
    model_features(model, conversations) -> {"top1", "top2", "entropy", "mean_logprob"[, "hidden"]}
    needs_model(strategy, round_index, hybrid_step) -> whether the strategy reads model features

Split from flywheel.trainer.selection, which chooses among candidates and knows nothing of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flywheel.errors import UserInputError
from flywheel.trainer.selection import Candidates, hybrid_uncertainty_share


def model_features(
    model: Any, conversations: Sequence[Sequence[dict[str, Any]]], *, with_hidden: bool = False, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """top1, top2, entropy (means over the first generated positions) and mean_logprob of the greedy
    answer the production model gives each conversation; `hidden_norm` (of its mean-pooled last hidden
    state) when asked. `model` is a flywheel.inference.local_model.LocalModel."""
    if not conversations:
        return {}
    generations = model.generate(list(conversations), max_new_tokens=model.confidence_positions, batch_size=batch_size)
    features = {
        "top1": np.array([float(np.mean(g.top1)) if g.top1 else 1.0 for g in generations]),
        "top2": np.array([float(np.mean(g.top2)) if g.top2 else 0.0 for g in generations]),
        "entropy": np.array([g.mean_entropy for g in generations]),
        "mean_logprob": np.array([g.mean_logprob for g in generations]),
    }
    if with_hidden:
        features["hidden_norm"] = np.linalg.norm(model.embed_last_hidden(list(conversations), batch_size=batch_size), axis=1).astype(
            np.float64
        )
    return features


def needs_model(strategy: str, round_index: int = 0, hybrid_step: float = 0.25) -> bool:
    """Whether a strategy reads the production model's token probabilities (this round)."""
    if strategy == "hybrid":
        return hybrid_uncertainty_share(round_index, hybrid_step) > 0
    return strategy in ("least_confidence", "margin", "entropy", "expected_change")


def candidates_from_store(
    ctx: Any, *, model: Any = None, with_hidden: bool = False, limit: int = 20_000, embedder: Any = None
) -> tuple[Candidates, list[str], dict[str, dict[str, Any]]]:
    """Failures a person could usefully label (not duplicates, not judged fine, not yet verified), highest
    risk first, at most `limit`. Embeddings are of the prompt's user text; token features come from
    `model` (a LocalModel) when given, for the unlabelled ones (labelled ones are never picked again).

    Returns (candidates, ids that already have a label, {id: {"intent", "text", "answer", "status"}}).
    """
    from flywheel.data.labels import latest_labels
    from flywheel.records import FailureStatus
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo
    from flywheel.store.vectors import Embedder

    skip = [str(FailureStatus.DUPLICATE), str(FailureStatus.NOT_FAILURE), str(FailureStatus.VERIFIED)]
    with ctx.store.engine.connect() as conn:
        rows = failure_repo.failures_not_in(conn, skip, limit)
        interactions = interaction_repo.get_many(conn, [r.interaction_id for r in rows])
        labelled = set(latest_labels(conn, [r.id for r in rows]))
    if not rows:
        raise UserInputError("no failures waiting for a label: ingest and triage first")
    prompts = [interactions[r.interaction_id].prompt_messages() for r in rows]
    texts = ["\n".join(m.content or "" for m in p if m.role == "user") for p in prompts]
    embeddings = (embedder or Embedder()).embed(texts)
    ids = [r.id for r in rows]
    features: dict[str, np.ndarray] = {}
    if model is not None:
        open_rows = [i for i, r in enumerate(rows) if r.id not in labelled]
        found = model_features(model, [[m.model_dump(exclude_none=True) for m in prompts[i]] for i in open_rows], with_hidden=with_hidden)
        neutral = {"top1": 1.0, "top2": 0.0, "entropy": 0.0, "mean_logprob": 0.0, "hidden_norm": 0.0}
        for name, values in found.items():
            full = np.full(len(rows), neutral[name], dtype=np.float64)
            full[open_rows] = values
            features[name] = full
    info = {
        r.id: {
            "intent": r.intent or interactions[r.interaction_id].intent,
            "status": str(r.status),
            "text": t[:200],
            "answer": _answer_text(interactions[r.interaction_id]),
        }
        for r, t in zip(rows, texts)
    }
    return Candidates(ids=ids, embeddings=embeddings, **features), sorted(labelled), info


def _answer_text(interaction: Any) -> str:
    """The logged answer as the person labelling it sees it (tool calls named, long text cut)."""
    answer = interaction.last_assistant()
    if answer is None:
        return ""
    calls = " ".join(f"[tool call {c.function.name}]" for c in answer.tool_calls or [])
    return ((answer.content or "") + (" " + calls if calls else "")).strip()[:500]
