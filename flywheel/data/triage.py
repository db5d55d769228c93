"""Triage: capture failures from interactions, group near-duplicates, take a risk-weighted sample.

Three passes, each safe to interrupt and re-run:

1. **Capture.** Interactions that no failure points to yet and whose signals match a rule
   (settings.rules, defined once in flywheel.data.rules) become `Failure`s with status `captured`. The
   rule conditions run in SQL first (flywheel.store.capture), so a 200k-row table streams through in
   pages and only candidates reach Python, where `matched_rules` (the source of truth) decides. One interaction yields at most one failure (`failure_id_for`), so
   a second run adds nothing.
2. **Cluster.** Captured failures not yet clustered are embedded in batches (last user message plus the
   answer) and compared with the cluster representatives already in the "failures" collection (from
   this run's earlier batches and from earlier triages) and, inside a batch, with each other (numpy).
   A failure whose similarity to a representative is >= triage.dedup_threshold becomes `duplicate`
   with `cluster_id` pointing at it; otherwise it represents a new cluster (`cluster_id` = its own id).
   A representative's `cluster_size` counts its members: the frequency of that mistake.
3. **Budget.** Each eligible cluster (representative `captured` or `skipped`) counts once, with the
   highest risk among its members. If there are more than triage.budget, every cluster with risk >=
   triage.must_take_risk is taken first (highest first), and the remaining places are sampled with
   probability proportional to risk, without replacement (Efraimidis-Spirakis keys, seeded).
   Taken: `triaged` (the judge's queue). Not taken: `skipped`, eligible again next time.

Risk of one failure = the largest weight among the rules it matched, times rules.high_value_multiplier
when the user's tier is in rules.high_value_tiers. `rule` is that largest-weight rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from flywheel.context import Context
from flywheel.data.rules import is_high_value, matched_rules
from flywheel.records import Failure, FailureStatus, Interaction
from flywheel.settings import Settings
from flywheel.settings_sections import RuleSettings
from flywheel.store import capture as capture_repo
from flywheel.store import failures as failure_repo
from flywheel.store import feedback as feedback_repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store
from flywheel.store.vectors import FAILURES, VectorIndex

ELIGIBLE = (str(FailureStatus.CAPTURED), str(FailureStatus.SKIPPED))
CAPTURE_PAGE = 2000  # interactions read per query
INSERT_BATCH = 1000  # failures written per transaction
CLUSTER_BATCH = 256  # failures embedded and compared at once
NEIGHBOURS = 3  # representatives fetched per failure (a stale index entry may take the first place)
EMBEDDING_CACHE = 50_000  # dedup texts remembered within one run (~1.5 kB each)


class TriageSummary(BaseModel):
    feedback_applied: int = 0  # gateway feedback applied late (its interaction was stored as it arrived)
    scanned: int = 0  # candidate interactions read (rule predicates matched in SQL)
    captured: int = 0  # new failures
    by_rule: dict[str, int] = {}  # new failures by their highest-risk rule
    clusters: int = 0  # new clusters (their representatives)
    duplicates: int = 0  # new failures folded into a cluster
    reindexed: int = 0  # representatives missing from the index, embedded again
    eligible: int = 0  # clusters competing for the budget
    budget: int = 0
    taken: int = 0  # -> triaged
    skipped: int = 0  # -> skipped


# --- capture ----------------------------------------------------------------------------------------------


def capture(interaction: Interaction, rules: RuleSettings) -> Failure | None:
    """The failure this interaction is, or None when no rule catches it."""
    found = matched_rules(interaction, rules)
    if not found:
        return None
    risk = rules.weights.get(found[0], 1.0)
    if is_high_value(interaction, rules):
        risk *= rules.high_value_multiplier
    return Failure(
        id=failure_repo.failure_id_for(interaction.id),
        interaction_id=interaction.id,
        rule=found[0],
        rules=found,
        risk=risk,
        first_seen_version=interaction.model_version,
        intent=interaction.intent,
    )


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def capture_new(store: Store, rules: RuleSettings, summary: TriageSummary) -> None:
    """Pass 1: store a `captured` failure for every not yet captured interaction a rule catches."""
    # SQL keeps the interactions some rule may catch (never fewer than matched_rules): Python has the last word.
    stream = capture_repo.iter_uncaptured_candidates(store, rules, batch=CAPTURE_PAGE)
    for page in _batched(stream, INSERT_BATCH):
        summary.scanned += len(page)
        found = [f for f in (capture(i, rules) for i in page) if f is not None]
        with store.begin() as conn:
            summary.captured += failure_repo.insert_failures(conn, found)
        for item in found:
            summary.by_rule[item.rule] = summary.by_rule.get(item.rule, 0) + 1


# --- near-duplicate clustering ----------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def answer_text(interaction: Interaction) -> str:
    message = interaction.last_assistant()
    if message is None:
        return ""
    parts = [message.content or ""]
    for call in message.tool_calls or []:
        parts.append(f"[tool {call.function.name}({call.function.arguments})]")
    return " ".join(p for p in parts if p)


def failure_text(interaction: Interaction) -> str:
    """What a failure looks like to the index: the last user message and the answer, clipped so that
    both fit the model's 256 tokens."""
    return f"user: {_clip(interaction.last_user_text(), 400)}\nassistant: {_clip(answer_text(interaction), 600)}"


def dedup_text(text: str) -> str:
    """Order numbers, amounts and dates differ between otherwise identical mistakes: fold every run of
    digits to one "0" before embedding, so "order 1234" and "order 5678" compare as the same."""
    return re.sub(r"\d+", "0", text)


@dataclass
class _Assignment:
    failure: Failure
    text: str
    embedding: np.ndarray
    representative: str  # its own id when it leads a cluster


def embed_cached(index: VectorIndex, texts: list[str], cache: dict[str, np.ndarray]) -> np.ndarray:
    """Embeddings of the dedup form of `texts`, remembering them for the rest of the run: templated
    mistakes repeat across batches word for word once digits are folded, and embedding is the cost."""
    keys = [dedup_text(t) for t in texts]
    missing = list(dict.fromkeys(k for k in keys if k not in cache))
    fresh = dict(zip(missing, index.embedder.embed(missing)))
    if len(cache) + len(fresh) <= EMBEDDING_CACHE:
        cache.update(fresh)
    return np.stack([fresh[k] if k in fresh else cache[k] for k in keys]) if keys else np.zeros((0, index.embedder.dim), np.float32)


def assign_clusters(
    index: VectorIndex, store: Store, batch: list[Failure], texts: list[str], threshold: float, cache: dict[str, np.ndarray] | None = None
) -> list[_Assignment]:
    """Leader clustering of one batch, highest risk first: join the most similar representative
    (already indexed, or led by an earlier failure of this batch) when it is >= threshold, else lead."""
    embeddings = embed_cached(index, texts, cache if cache is not None else {})
    neighbours = index.query_embeddings(FAILURES, embeddings, k=NEIGHBOURS)
    with store.engine.connect() as conn:
        # The index may hold entries the store does not (an interrupted run, a reset database): only
        # representatives the store knows may gather duplicates.
        known = failure_repo.representatives_among(conn, sorted({h.id for hits in neighbours for h in hits}))
    order = sorted(range(len(batch)), key=lambda i: (-batch[i].risk, batch[i].id))
    out: list[_Assignment | None] = [None] * len(batch)
    leaders: list[int] = []
    for i in order:
        best_id, best_sim = None, -1.0
        for hit in neighbours[i] if neighbours else []:
            if hit.id != batch[i].id and hit.id in known and hit.similarity > best_sim:
                best_id, best_sim = hit.id, hit.similarity
        if leaders:
            sims = embeddings[leaders] @ embeddings[i]
            j = int(np.argmax(sims))
            if float(sims[j]) > best_sim:
                best_id, best_sim = batch[leaders[j]].id, float(sims[j])
        if best_id is not None and best_sim >= threshold:
            out[i] = _Assignment(batch[i], texts[i], embeddings[i], representative=best_id)
        else:
            out[i] = _Assignment(batch[i], texts[i], embeddings[i], representative=batch[i].id)
            leaders.append(i)
    return [a for a in out if a is not None]


def _metadata(item: Failure) -> dict:
    return {
        "failure_id": item.id,
        "interaction_id": item.interaction_id,
        "intent": item.intent,
        "rule": item.rule,
        "first_seen_version": item.first_seen_version,
        "risk": item.risk,
    }


def _unclustered(store: Store, limit: int, exclude: set[str]) -> list[Failure]:
    rows = failure_repo.unclustered(store, limit + len(exclude))
    return [f for f in rows if f.id not in exclude][:limit]


def cluster_new(store: Store, index: VectorIndex, threshold: float, summary: TriageSummary, batch_size: int | None = None) -> None:
    """Pass 2: give every captured, unclustered failure a cluster, highest risk first."""
    batch_size = batch_size or CLUSTER_BATCH
    seen: set[str] = set()  # guards against a row that (for any reason) stays unclustered
    cache: dict[str, np.ndarray] = {}
    while batch := _unclustered(store, batch_size, seen):
        seen.update(f.id for f in batch)
        with store.engine.connect() as conn:
            found = interaction_repo.get_many(conn, [f.interaction_id for f in batch])
        texts = [failure_text(found[f.interaction_id]) for f in batch]
        assigned = assign_clusters(index, store, batch, texts, threshold, cache)
        leads = [a for a in assigned if a.representative == a.failure.id]
        # The index first: if we stop before the store is updated, these failures are unclustered next
        # time, meet their own entries (ignored: same id) and are written again.
        index.upsert(
            FAILURES,
            [a.failure.id for a in leads],
            [a.text for a in leads],
            [_metadata(a.failure) for a in leads],
            embeddings=np.stack([a.embedding for a in leads]) if leads else None,
        )
        grown = Counter(a.representative for a in assigned)
        with store.begin() as conn:
            for a in assigned:
                if a.representative == a.failure.id:
                    failure_repo.set_cluster(conn, a.failure.id, a.failure.id, grown[a.failure.id])
                else:
                    failure_repo.set_cluster(conn, a.failure.id, a.representative, 1, status=FailureStatus.DUPLICATE)
            # Representatives from earlier batches or triages: count their members again.
            older = sorted(set(grown) - {a.failure.id for a in leads})
            if older:
                for rep_id, size in failure_repo.cluster_sizes(conn, older):
                    failure_repo.set_cluster(conn, rep_id, rep_id, size)
        summary.clusters += len(leads)
        summary.duplicates += len(assigned) - len(leads)


def reindex_missing(store: Store, index: VectorIndex, summary: TriageSummary) -> None:
    """Embed representatives the index lost (a deleted folder, a new Chroma server). Cheap when nothing
    is missing: one count on each side."""
    with store.engine.connect() as conn:
        stored = failure_repo.count_representatives(conn)
        if index.count(FAILURES) >= stored:
            return
        rep_ids = failure_repo.representative_ids(conn)
    for chunk in _batched(rep_ids, CLUSTER_BATCH):
        present = {h.id for h in index.get(FAILURES, ids=chunk)}
        missing = [i for i in chunk if i not in present]
        if not missing:
            continue
        with store.engine.connect() as conn:
            items = failure_repo.get_failures(conn, ids=missing)
            found = interaction_repo.get_many(conn, [f.interaction_id for f in items])
        texts = [failure_text(found[f.interaction_id]) for f in items]
        index.upsert(
            FAILURES,
            [f.id for f in items],
            texts,
            [_metadata(f) for f in items],
            embeddings=index.embedder.embed([dedup_text(t) for t in texts]),
        )
        summary.reindexed += len(items)


# --- risk-weighted sampling -------------------------------------------------------------------------------


def select_within_budget(
    clusters: Sequence[tuple[str, float]], budget: int, must_take_risk: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split (id, risk) clusters into (taken, skipped). At most `budget` taken: every cluster with
    risk >= must_take_risk first, highest first; then a weighted sample without replacement, each
    remaining cluster drawn with probability proportional to its risk (Efraimidis-Spirakis: the
    largest log(u)/w keys). The same clusters and seed always give the same split."""
    ordered = sorted(clusters, key=lambda c: c[0])  # input order must not change the sample
    if len(ordered) <= budget:
        return [c[0] for c in ordered], []
    must = sorted((c for c in ordered if c[1] >= must_take_risk), key=lambda c: (-c[1], c[0]))
    taken = [c[0] for c in must[:budget]]
    rest = [c for c in ordered if c[1] < must_take_risk]
    places = budget - len(taken)
    if places > 0 and rest:
        rng = np.random.default_rng(seed)
        weights = np.array([max(c[1], 1e-9) for c in rest])
        keys = np.log(rng.random(len(rest))) / weights  # log(u)/w: larger is more likely for larger w
        chosen = np.argsort(-keys, kind="stable")[:places]
        taken.extend(rest[i][0] for i in sorted(chosen))
    taken_set = set(taken)
    return taken, [c[0] for c in ordered if c[0] not in taken_set]


def apply_budget(store: Store, settings: Settings, budget: int, summary: TriageSummary) -> None:
    """Pass 3: choose which eligible clusters the judge sees now."""
    rows = failure_repo.cluster_risks(store, ELIGIBLE)
    status_of = {r.id: r.status for r in rows}
    taken, skipped = select_within_budget([(r.id, r.risk) for r in rows], budget, settings.triage.must_take_risk, settings.triage.seed)
    newly_skipped = [i for i in skipped if status_of[i] != str(FailureStatus.SKIPPED)]
    with store.begin() as conn:
        failure_repo.set_status(conn, taken, FailureStatus.TRIAGED)
        failure_repo.set_status(conn, newly_skipped, FailureStatus.SKIPPED)
    summary.eligible, summary.budget = len(rows), budget
    summary.taken, summary.skipped = len(taken), len(skipped)


def triage(ctx: Context, budget: int | None = None) -> TriageSummary:
    """Capture, cluster and sample. Returns what happened; re-running with nothing new captures nothing
    and only re-samples clusters skipped before."""
    settings = ctx.settings
    summary = TriageSummary()
    # Feedback a concurrent insert missed (several gateways on one store) sets signals the capture rules read.
    summary.feedback_applied = feedback_repo.sweep(ctx.store)
    capture_new(ctx.store, settings.rules, summary)
    reindex_missing(ctx.store, ctx.index, summary)
    cluster_new(ctx.store, ctx.index, settings.triage.dedup_threshold, summary)
    apply_budget(ctx.store, settings, budget or settings.triage.budget, summary)
    return summary
