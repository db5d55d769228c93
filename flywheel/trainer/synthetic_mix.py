"""How generated samples (flywheel.synthesis) enter a snapshot: beside the verified problem rows, never
instead of them, and never more than the settings allow.

`build_snapshot` calls these on the rows left after the test-set filter:

1. `drop_conflicts`  a generated row whose prompt is also a verified row's prompt is left out: the
                     verified answer was checked for that very conversation, a generated one was not.
2. `cap_per_intent`  at most `synthesis.max_per_intent` generated rows per intent (at random, by seed).
3. `cap_share`       after the replay mix, generated rows are at most `synthesis.max_share` of the rows.

They are outside the problem-type cap on purpose: that cap keeps one failure type from crowding out
the others among real failures; generated rows have caps of their own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from flywheel.trainer.balance import Ledger, Sample, counts, step_rng

SYNTHETIC = "synthetic"


def split(rows: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(real rows, generated rows)."""
    return [r for r in rows if r.source != SYNTHETIC], [r for r in rows if r.source == SYNTHETIC]


def drop_conflicts(real: list[Sample], generated: list[Sample], ledger: Ledger) -> list[Sample]:
    prompts = {r.group for r in real if r.group}
    kept = [g for g in generated if g.group not in prompts]
    ledger.step("synthetic_conflicts", len(generated), len(kept), dropped=len(generated) - len(kept))
    return kept


def cap_per_intent(generated: list[Sample], max_per_intent: int, seed: int, ledger: Ledger) -> list[Sample]:
    by_intent: dict[str, list[Sample]] = defaultdict(list)
    for row in generated:
        by_intent[row.intent].append(row)
    rng = step_rng(seed, "synthetic_per_intent")
    kept: list[Sample] = []
    for intent in sorted(by_intent):
        rows = by_intent[intent]
        kept.extend(rows if len(rows) <= max_per_intent else sorted(rng.sample(rows, max_per_intent), key=lambda r: r.key))
    ledger.step("synthetic_per_intent_cap", len(generated), len(kept), max_per_intent=max_per_intent, by_generator=counts(kept, "origin"))
    return kept


def cap_share(rows: list[Sample], max_share: float, seed: int, ledger: Ledger, priority: Sequence[str] = ()) -> list[Sample]:
    """Keep generated rows round-robin over intents (so no intent loses all of its own first) until they
    are `max_share` of the rows. Inside an intent, rows of generators earlier in `priority`
    (synthesis.generators, in order) are kept first: by default mined rows, which are real users' words,
    before rewrites of them."""
    real, generated = split(rows)
    # g <= share * (r + g)  <=>  g <= share * r / (1 - share)
    allowed = len(generated) if max_share >= 1 else math.floor(max_share * len(real) / (1 - max_share) + 1e-9)
    if len(generated) <= allowed:
        ledger.step("synthetic_share_cap", len(rows), len(rows), synthetic=len(generated), max_share=max_share)
        return rows
    rng = step_rng(seed, "synthetic_share")
    by_intent: dict[str, list[Sample]] = defaultdict(list)
    for row in generated:
        by_intent[row.intent].append(row)
    rank = {f"{SYNTHETIC}:{name}": n for n, name in enumerate(priority)}
    queues = []
    for intent in sorted(by_intent):
        shuffled = rng.sample(by_intent[intent], len(by_intent[intent]))
        queues.append(sorted(shuffled, key=lambda r: rank.get(r.origin, len(rank))))  # stable: random inside a generator
    chosen: set[int] = set()
    while len(chosen) < allowed:
        for queue in queues:
            if queue and len(chosen) < allowed:
                chosen.add(id(queue.pop(0)))
    out = [r for r in rows if r.source != SYNTHETIC or id(r) in chosen]
    ledger.step("synthetic_share_cap", len(rows), len(out), synthetic=allowed, max_share=max_share)
    return out
