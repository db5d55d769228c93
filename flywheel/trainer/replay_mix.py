"""Rule 3 of a snapshot's balancing (see flywheel.trainer.balance): mix baseline replay rows with the problem rows.

    mix_replay(rows, ...) -> rows with replay drawn so that problem rows are the target share of the set

Strategies: "weighted" draws tiers by tier weight; "counter" first shares replay out per intent, most to
the intents the problem rows correct away from; "boundary" also gives most to (and draws first) the replay
rows nearest each problem row by embedding (`boundary_neighbours`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from flywheel.trainer.balance import PROBLEM, Embed, Ledger, Sample, counts, step_rng


def rejected_intent(sample: Sample) -> str | None:
    """The intent the original, failing answer gave (its JSON "intent" field), if it says one."""
    content = (sample.rejected or {}).get("content") or ""
    if not content.lstrip().startswith("{"):
        return None
    try:
        said = json.loads(content).get("intent")
    except (ValueError, AttributeError):
        return None
    return said if isinstance(said, str) and said else None


def boundary_neighbours(problems: Sequence[Sample], replay: Sequence[Sample], embed: Embed, k: int) -> dict[int, int]:
    """Replay rows that sit on the far side of a new boundary: for each problem row, the `k` replay rows
    of another intent whose last user turn is nearest to its own (cosine over `embed`). Returns replay
    index -> how many problem rows named it.

    A correction that teaches "this request is T" also moves every request that looks like it towards T,
    including those that really are a neighbouring intent N the model used to get right. Replaying those
    N rows, the ones nearest the corrections, is meant to teach the boundary from both sides. Measured
    against per-intent replay on the 40-intent demo pack it made no difference (docs/learning.md)."""
    if not problems or not replay or k <= 0:
        return {}
    import numpy as np

    vectors = np.asarray(embed([_user_text(s) for s in problems] + [_user_text(s) for s in replay]), dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    near, pool = vectors[: len(problems)], vectors[len(problems) :]
    similarity = near @ pool.T
    replay_intents = np.array([s.intent for s in replay], dtype=object)
    named: Counter[int] = Counter()
    for row, sample in enumerate(problems):
        scores = np.where(replay_intents != sample.intent, similarity[row], -np.inf)
        for index in np.argsort(-scores, kind="stable")[:k]:
            if np.isfinite(scores[index]):
                named[int(index)] += 1
    return dict(named)


def _user_text(sample: Sample) -> str:
    users = [m.get("content") or "" for m in sample.prompt if m.get("role") == "user"]
    return users[-1] if users else sample.last_user


def replay_quotas(
    problems: Sequence[Sample], available: Mapping[str, int], want: int, boundary: Mapping[str, int] | None = None
) -> dict[str, int]:
    """How many replay rows to draw per intent ("counter" replay).

    Every problem row that corrects an answer of intent H teaches "not H here"; left alone, the model
    learns to avoid H everywhere and forgets the requests that really are H. So each intent's weight is
    1 (every served intent keeps some replay) plus the number of problem rows pushing away from it, and
    `want` rows are shared out by weight (largest remainders), never more than an intent has; what an
    intent cannot take goes to the others by the same weights. `boundary` (intent -> boundary rows, see
    `boundary_neighbours`) adds to an intent's weight the same way."""
    pushed = Counter(i for i in (rejected_intent(p) for p in problems) if i)
    boundary = boundary or {}
    weights = {intent: 1.0 + pushed.get(intent, 0) + boundary.get(intent, 0) for intent, n in available.items() if n > 0}
    quota = {intent: 0 for intent in weights}
    left = min(want, sum(available.values()))
    while left > 0 and weights:
        total = sum(weights.values())
        shares = {i: left * w / total for i, w in weights.items()}
        grant = {i: min(math.floor(x), available[i] - quota[i]) for i, x in shares.items()}
        given = sum(grant.values())
        # the rows floor() left over go to the largest remainders among intents with room
        order = sorted(weights, key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
        for intent in order:
            if given >= left:
                break
            if quota[intent] + grant[intent] < available[intent]:
                grant[intent] += 1
                given += 1
        if given == 0:
            break
        for intent, n in grant.items():
            quota[intent] += n
        left -= given
        weights = {i: w for i, w in weights.items() if quota[i] < available[i]}
    return quota


def mix_replay(
    rows: list[Sample],
    min_share: float,
    max_share: float,
    target_share: float | None,
    tier_weights: Mapping[str, float],
    seed: int,
    ledger: Ledger,
    strategy: str = "counter",
    embed: Embed | None = None,
    boundary_k: int = 3,
) -> list[Sample]:
    """Keep every problem row and draw replay rows so problems are `target_share` of the set.

    `strategy` says which replay rows: "weighted" draws by tier weight alone; "counter" first shares
    the rows out per intent (`replay_quotas`), then draws by tier weight inside each intent, with rows
    a person confirmed (label_fine) ahead of unconfirmed production rows; "boundary" is "counter" that
    also weighs and draws first the replay rows nearest the problem rows (`boundary_neighbours`, with
    `embed`), so each new boundary is taught from both sides.

    When there are too few replay rows to bring problems down to `max_share`, every replay row is used
    and every problem row is still kept: the snapshot exists to teach the new fixes, and dropping most
    of them to satisfy a ratio would train on almost nothing. The manifest warns, so the operator can
    add baseline rows (graduate samples, or pass stable production samples as extra rows).
    """
    problems = [r for r in rows if r.pool == PROBLEM]
    replay = sorted((r for r in rows if r.pool != PROBLEM), key=lambda r: r.key)
    share = min(max(target_share if target_share is not None else (min_share + max_share) / 2, min_share), max_share)
    if target_share is not None and share != target_share:
        ledger.warnings.append(f"replay_target_share {target_share} lies outside [{min_share}, {max_share}]; aimed at {share}")
    n_prob = len(problems)
    want = round(n_prob * (1 - share) / share)
    need = math.ceil(n_prob * (1 - max_share) / max_share - 1e-9)  # the least replay keeping problems <= max
    limit = math.floor(n_prob * (1 - min_share) / min_share + 1e-9) if min_share > 0 else want
    want = min(max(want, need), limit)
    eligible = [r for r in replay if tier_weights.get(r.tier, 1.0) > 0]
    rng = step_rng(seed, "replay_mix")
    # Efraimidis-Spirakis: key u^(1/w), the largest keys win; a tier of weight 3 is drawn ahead of one of
    # weight 1 without ever being drawn twice.
    by_intent = strategy in ("counter", "boundary")
    near: dict[int, int] = {}
    if strategy == "boundary":
        if embed is None:
            raise ValueError('replay_strategy "boundary" needs an embedding function')
        near = boundary_neighbours(problems, eligible, embed, boundary_k)
    boundary: Counter[str] = Counter()
    for i, n in near.items():
        boundary[eligible[i].intent] += n
    # Draw order: rows nearest a new boundary, then rows a person confirmed, then by tier weight.
    keyed = sorted(
        (
            (near.get(i, 0), r.origin == "label_fine" and by_intent, rng.random() ** (1.0 / tier_weights.get(r.tier, 1.0)), i)
            for i, r in enumerate(eligible)
        ),
        reverse=True,
    )
    if by_intent:
        quota = replay_quotas(problems, counts(eligible, "intent"), want, boundary)
        drawn = []
        for *_, i in keyed:
            if quota.get(eligible[i].intent, 0) > 0:
                quota[eligible[i].intent] -= 1
                drawn.append(eligible[i])
    else:
        drawn = [eligible[i] for *_, i in keyed[:want]]
    if len(eligible) < need:
        actual = n_prob / (n_prob + len(drawn)) if n_prob else 0.0
        ledger.warnings.append(
            f"only {len(eligible)} replay row(s) for {n_prob} problem row(s): problems are {actual:.0%} of the set, "
            f"above replay_max_share {max_share:.0%}; all problem rows were kept"
        )
    final = problems + drawn
    near_ids = {id(eligible[i]) for i in near}
    ledger.step(
        "replay_mix",
        len(rows),
        len(final),
        problem_rows=n_prob,
        replay_available=len(replay),
        replay_available_by_tier=counts(replay, "tier"),
        replay_drawn=len(drawn),
        replay_drawn_by_tier=counts(drawn, "tier"),
        target_share=share,
        problem_share=round(n_prob / len(final), 6) if final else 0.0,
        strategy=strategy,
        replay_drawn_by_intent=counts(drawn, "intent") if by_intent else None,
        boundary_rows_drawn=sum(1 for r in drawn if id(r) in near_ids) if near else None,
    )
    return final
