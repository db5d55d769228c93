"""The balancing rules of a dataset snapshot: pure functions over `Sample`s, one rule each.

`flywheel.trainer.dataset.build_snapshot` runs them in this order, and the manifest records the counts
before and after each:

1. `cap_problem_types`   new problem rows: no failure type above `problem_type_max_ratio` of them
                         (down-sampling keeps a person's labels, then higher severities first).
2. `oversample_rare_high_risk`  a rare type's rows of an oversampled severity are repeated toward
                         `oversample_target_ratio` of the problem rows, each row at most `max_repeats` times.
3. `mix_replay`          (flywheel.trainer.replay_mix) baseline rows are drawn so that problem rows are the target share of the set,
                         inside [replay_min_share, replay_max_share]; tiers are drawn by `tier_weights`
                         (weighted sampling without replacement); with replay_strategy "counter", first
                         shared out per intent, most to the intents the problem rows correct away from;
                         with "boundary", also most to (and first) the replay rows nearest the problem
                         rows. Too little baseline: every problem row is kept and the manifest warns.
4. `split_heldout`       held-out rows, stratified by (intent, problem-or-replay), whole prompt groups at a
                         time, before any intent re-balancing so no repeated copy crosses the split.
5. `intent_floor`        an intent with fewer than `intent_min_samples` training rows is over-sampled,
                         each row at most `max_repeats` times in total.
6. `intent_cap`          no intent above `intent_max_ratio` of the training rows; inside a capped intent the
                         problem and replay rows are cut in proportion so the replay share holds.
7. `row_weight`          loss weight = loss_weights[category] x tier_weights[tier] x the failure's weight.

Later rules can move what earlier ones set by a row or two (a floor adds repeats after the mix; a cap
removes rows after the type cap); `checks` measures every rule on the final rows and the manifest
warns when one does not hold.

A `Sample` is one source row; a repeat is the same object appearing again in the list, so counting
copies is counting keys.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Embed = Callable[[Sequence[str]], Any]  # texts -> one vector per text (store.vectors.Embedder.embed)

PROBLEM = "problem"
REPLAY = "replay"
LABEL = "label"  # Sample.origin of a row built from a person's label
SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


@dataclass(eq=False)
class Sample:
    key: str  # the failure id, or "x-<hash>" for a caller-supplied row; every copy shares it
    tier: str
    intent: str
    problem_type: str
    severity: str | None
    category: str
    base_weight: float  # the failure's own weight (tier moves can set it), or the supplied row's
    prompt: list[dict[str, Any]]
    answer: str
    rejected: dict[str, Any] | None  # the original failing assistant message (DPO's rejected side)
    group: str  # normalised text of all user turns: rows with the same prompt stay on one side of the split
    last_user: str  # normalised text of the last user turn
    source: str = "store"  # store | extra
    # what the row was built from (the manifest's per-source accounting): label, label_fine, kb_correction,
    # reply_correction, llm_correction, correction, baseline, production_replay, extra
    origin: str = "extra"

    @property
    def pool(self) -> str:
        return PROBLEM if self.tier == PROBLEM else REPLAY


@dataclass
class Ledger:
    """What each step did, and what could not be honoured."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def step(self, name: str, before: int, after: int, **detail: Any) -> None:
        self.steps.append({"step": name, "before": before, "after": after, **detail})


def step_rng(seed: int, step: str) -> random.Random:
    # One generator per step: changing one rule's draw does not reshuffle every later step.
    return random.Random(f"{seed}:{step}")


def counts(rows: Iterable[Sample], attr: str) -> dict[str, int]:
    return dict(sorted(Counter(getattr(r, attr) for r in rows).items()))


def bucket_cap(sizes: Mapping[str, int], ratio: float) -> tuple[int, float]:
    """The largest per-bucket count c with c <= ratio x sum(min(n, c)): capping every bucket at c leaves
    none above `ratio` of what remains. Returns (c, the ratio used).

    ratio x buckets < 1 cannot hold (even equal buckets are 1/buckets each); the ratio is then relaxed to
    1/buckets, which caps every bucket at the smallest one's size.
    """
    present = [n for n in sizes.values() if n > 0]
    if not present:
        return 0, ratio
    used = max(ratio, 1.0 / len(present))
    if max(present) <= used * sum(present) + 1e-9:
        return max(present), used
    # f(c) = used * sum(min(n, c)) - c is concave with f(0) = 0, so {c : f(c) >= 0} is [0, c*].
    lo, hi = 0, max(present)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid <= used * sum(min(n, mid) for n in present) + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo, used


def _keep(rows: Sequence[Sample], n: int, rng: random.Random) -> list[Sample]:
    """n of rows: first copies before repeats, then higher severity, then at random."""
    seen: Counter[str] = Counter()
    ranked = []
    for index, row in enumerate(rows):
        ranked.append((seen[row.key], -SEVERITY_RANK.get(row.severity or "", -1), rng.random(), index))
        seen[row.key] += 1
    chosen = sorted(sorted(ranked)[:n], key=lambda t: t[3])
    return [rows[t[3]] for t in chosen]


def _repeat_toward(rows: list[Sample], pool: Sequence[Sample], have: int, target: int, copies: Counter[str], max_repeats: int) -> int:
    """Append copies of pool rows round-robin until `have` reaches target or every row is at
    max_repeats copies. Returns how many were added."""
    added = 0
    while have + added < target:
        progress = False
        for row in pool:
            if have + added >= target:
                break
            if copies[row.key] < max_repeats:
                rows.append(row)
                copies[row.key] += 1
                added += 1
                progress = True
        if not progress:
            break
    return added


def _unique(rows: Iterable[Sample]) -> list[Sample]:
    seen: dict[str, Sample] = {}
    for row in rows:
        seen.setdefault(row.key, row)
    return sorted(seen.values(), key=lambda r: r.key)


# --- 1. failure types --------------------------------------------------------------------------------------


def cap_problem_types(rows: list[Sample], ratio: float, seed: int, ledger: Ledger) -> list[Sample]:
    problems = [r for r in rows if r.pool == PROBLEM]
    others = [r for r in rows if r.pool != PROBLEM]
    before = counts(problems, "problem_type")
    cap, used = bucket_cap(before, ratio)
    if used > ratio + 1e-12:
        ledger.warnings.append(
            f"problem_type_max_ratio {ratio} cannot hold with {len(before)} problem type(s); capped at 1/{len(before)} (equal types)"
        )
    rng = step_rng(seed, "problem_type_cap")
    kept: list[Sample] = []
    for name in before:
        members = [r for r in problems if r.problem_type == name]
        if len(members) <= cap:
            kept.extend(members)
            continue
        # A person's label is the budgeted, chosen row: the cap trims what arrived without one. Once the
        # model has fixed one type (the next cycle sees few of it), an equal-share cap would otherwise
        # throw away most of the labels of the type still failing.
        labelled = [r for r in members if r.origin == LABEL]
        rest = [r for r in members if r.origin != LABEL]
        kept.extend(labelled + _keep(rest, max(0, cap - len(labelled)), rng))
    ledger.step(
        "problem_type_cap",
        len(rows),
        len(others) + len(kept),
        problem_rows_before=len(problems),
        problem_rows_after=len(kept),
        cap=cap,
        ratio=used,
        by_type_before=before,
        by_type_after=counts(kept, "problem_type"),
    )
    return others + kept


# --- 2. rare high-risk types --------------------------------------------------------------------------------


def oversample_rare_high_risk(
    rows: list[Sample], severities: Sequence[str], target_ratio: float, type_max_ratio: float, max_repeats: int, ledger: Ledger
) -> list[Sample]:
    problems = [r for r in rows if r.pool == PROBLEM]
    # Never push a type past the cap step 1 just enforced.
    target = math.floor(min(target_ratio, type_max_ratio) * len(problems))
    copies = Counter(r.key for r in rows)
    out = list(rows)
    added: dict[str, int] = {}
    for name, have in counts(problems, "problem_type").items():
        if have >= target:
            continue
        risky = [r for r in _unique(p for p in problems if p.problem_type == name) if r.severity in severities]
        if risky:
            n = _repeat_toward(out, risky, have, target, copies, max_repeats)
            if n:
                added[name] = n
    ledger.step("oversample_high_risk", len(rows), len(out), target_per_type=target, severities=list(severities), added_by_type=added)
    return out


# --- 4. held-out split --------------------------------------------------------------------------------------


def split_heldout(rows: list[Sample], ratio: float, seed: int, ledger: Ledger) -> tuple[list[Sample], list[Sample]]:
    """Held-out prompt groups, stratified by (intent, pool) with largest-remainder quotas. A stratum keeps
    at least one group for training, so an intent seen once is never held out entirely."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, members in sorted(groups.items()):
        first = min(members, key=lambda r: r.key)
        strata[(first.intent, first.pool)].append(name)
    total = round(ratio * len(groups))
    quota = {s: math.floor(ratio * len(g)) for s, g in strata.items()}
    spare = sorted((-(ratio * len(g) - quota[s]), s) for s, g in strata.items() if len(g) - quota[s] >= 2)
    for _, s in spare[: max(0, total - sum(quota.values()))]:
        quota[s] += 1
    rng = step_rng(seed, "heldout")
    held: set[str] = set()
    for s in sorted(strata):
        names = list(strata[s])
        rng.shuffle(names)
        held.update(names[: quota[s]])
    train = [r for r in rows if r.group not in held]
    heldout = _unique(r for r in rows if r.group in held)  # one copy each: repeats only matter in training
    ledger.step(
        "heldout_split",
        len(rows),
        len(train),
        heldout=len(heldout),
        heldout_groups=len(held),
        ratio=ratio,
        heldout_by_intent=counts(heldout, "intent"),
    )
    return train, heldout


# --- 5, 6. intents ------------------------------------------------------------------------------------------


def intent_floor(rows: list[Sample], min_samples: int, max_repeats: int, ledger: Ledger) -> list[Sample]:
    out = list(rows)
    copies = Counter(r.key for r in rows)
    added: dict[str, int] = {}
    for name, have in counts(rows, "intent").items():
        if have < min_samples:
            n = _repeat_toward(out, _unique(r for r in rows if r.intent == name), have, min_samples, copies, max_repeats)
            if n:
                added[name] = n
    short = {k: v for k, v in counts(out, "intent").items() if v < min_samples}
    if short:
        ledger.warnings.append(
            f"{len(short)} intent(s) stay under intent_min_samples {min_samples} even with every row repeated up to max_repeats {max_repeats}: "
            + ", ".join(f"{k} ({v})" for k, v in short.items())
        )
    ledger.step("intent_floor", len(rows), len(out), min_samples=min_samples, added_by_intent=added, short=short)
    return out


def intent_cap(rows: list[Sample], ratio: float, seed: int, ledger: Ledger) -> list[Sample]:
    before = counts(rows, "intent")
    cap, used = bucket_cap(before, ratio)
    if used > ratio + 1e-12:
        ledger.warnings.append(
            f"intent_max_ratio {ratio} cannot hold with {len(before)} intent(s); capped at 1/{len(before)} (equal intents)"
        )
    rng = step_rng(seed, "intent_cap")
    out: list[Sample] = []
    for name, have in before.items():
        members = [r for r in rows if r.intent == name]
        if have <= cap:
            out.extend(members)
            continue
        problems = [r for r in members if r.pool == PROBLEM]
        replay = [r for r in members if r.pool != PROBLEM]
        keep_problems = round(cap * len(problems) / have)  # cut both pools alike: the replay share holds
        out.extend(_keep(problems, keep_problems, rng))
        out.extend(_keep(replay, cap - keep_problems, rng))
    ledger.step("intent_cap", len(rows), len(out), cap=cap, ratio=used, by_intent_before=before, by_intent_after=counts(out, "intent"))
    return out


# --- 7. weights and the final measurements ------------------------------------------------------------------


def row_weight(row: Sample, loss_weights: Mapping[str, float], tier_weights: Mapping[str, float]) -> float:
    """A category or tier not named in the settings weighs 1.0 (the problem tier is not in tier_weights)."""
    return round(loss_weights.get(row.category, 1.0) * tier_weights.get(row.tier, 1.0) * row.base_weight, 6)


def composition(rows: Sequence[Sample]) -> dict[str, Any]:
    n = len(rows)
    return {
        "rows": n,
        "unique": len({r.key for r in rows}),
        "by_intent": counts(rows, "intent"),
        "by_problem_type": counts(rows, "problem_type"),
        "by_tier": counts(rows, "tier"),
        "by_category": counts(rows, "category"),
        "by_source": counts(rows, "source"),
        "by_origin": counts(rows, "origin"),
        "problem_share": round(sum(r.pool == PROBLEM for r in rows) / n, 6) if n else 0.0,
    }


def checks(rows: Sequence[Sample], s: Any) -> dict[str, Any]:
    """Each rule measured on the final training rows. `s` is the DatasetSettings used."""
    n = len(rows) or 1
    problems = [r for r in rows if r.pool == PROBLEM]
    intent_share = max(counts(rows, "intent").values(), default=0) / n
    type_share = max(counts(problems, "problem_type").values(), default=0) / (len(problems) or 1)
    share = len(problems) / n
    copies = max(Counter(r.key for r in rows).values(), default=0)
    return {
        "intent_max_share": {
            "limit": s.intent_max_ratio,
            "actual": round(intent_share, 6),
            "held": intent_share <= s.intent_max_ratio + 1e-9,
        },
        "problem_type_max_share": {
            "limit": s.problem_type_max_ratio,
            "actual": round(type_share, 6),
            "held": type_share <= s.problem_type_max_ratio + 1e-9,
        },
        "problem_share": {
            "min": s.replay_min_share,
            "max": s.replay_max_share,
            "actual": round(share, 6),
            "held": s.replay_min_share - 1e-9 <= share <= s.replay_max_share + 1e-9,
        },
        "max_copies": {"limit": s.max_repeats, "actual": copies, "held": copies <= s.max_repeats},
    }
