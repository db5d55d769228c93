"""The "mining" generator: unlabelled captured queries near verified samples, pseudo-labelled.

For every captured query no person labelled, its `mining_k` nearest verified samples (by embedding,
the same all-MiniLM-L6-v2 vectors the index holds) vote for an intent, each vote weighted by its
similarity. The query becomes a sample of that intent only where the neighbours agree (the winning
intent holds at least `mining_agreement` of the weight) and the nearest one is close (at least
`mining_min_similarity`). Its answer is the intent's verified answer, which the scorer then checks like
any other (rule judge, label consistency, duplicates, leakage), so a pseudo-label is never trusted on
the vote alone.

Only samples a person vouched for vote: labelled failures, answers a person confirmed, and graduated
baseline samples. Mining ignores `inputs.wants`: it relabels failures that already happened, whatever
their intent, rather than writing new text for short intents. A correction of an unlabelled failure carries the intent the production model
logged, which is exactly what may be wrong, so it does not vote.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from flywheel.records import Interaction
from flywheel.synthesis.records import Generated, GeneratorOutput, Seed, SynthesisInputs

NAME = "mining"
TRUSTED_ORIGINS = frozenset({"label", "label_fine", "baseline"})
NO_PROBLEM = "none"


def trusted(seeds: Sequence[Seed]) -> list[Seed]:
    return [s for s in seeds if s.origin in TRUSTED_ORIGINS and s.last_user().strip()]


def answers_by_intent(seeds: Sequence[Seed]) -> dict[str, str]:
    """The most common verified answer per intent (ties: the smallest text, so the choice is stable)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for seed in seeds:
        if seed.answer.strip():
            counts[seed.intent][seed.answer] += 1
    return {intent: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for intent, c in counts.items()}


def vote(similarities: np.ndarray, intents: Sequence[str], k: int) -> tuple[str, float, float]:
    """(winning intent, its share of the similarity-weighted vote, the nearest similarity) over the k
    nearest rows of one query's similarity vector."""
    nearest = np.argsort(-similarities)[:k]
    weights: dict[str, float] = defaultdict(float)
    for row in nearest:
        weights[intents[row]] += max(float(similarities[row]), 0.0)
    total = sum(weights.values()) or 1.0
    intent, weight = min(weights.items(), key=lambda kv: (-kv[1], kv[0]))
    return intent, weight / total, float(similarities[nearest[0]])


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    cfg = inputs.settings.synthesis
    reference = trusted(inputs.seeds)
    queries = [i for i in inputs.unlabelled if i.last_user_text().strip() and i.prompt_messages()]
    if not reference or not queries or inputs.embed is None:
        return GeneratorOutput()
    answers = answers_by_intent(inputs.seeds)
    ref_vectors = inputs.embed([s.last_user() for s in reference])
    intents = [s.intent for s in reference]
    problems_of: dict[str, Counter[str]] = defaultdict(Counter)
    for seed in inputs.seeds:
        if seed.problem_type != NO_PROBLEM:
            problems_of[seed.intent][seed.problem_type] += 1
    out = GeneratorOutput()
    for start in range(0, len(queries), 512):
        batch = queries[start : start + 512]
        sims = inputs.embed([q.last_user_text() for q in batch]) @ ref_vectors.T
        for interaction, row in zip(batch, sims):
            intent, agreement, nearest = vote(row, intents, cfg.mining_k)
            if agreement < cfg.mining_agreement or nearest < cfg.mining_min_similarity or intent not in answers:
                continue
            if answers[intent] == _logged_answer(interaction):
                continue  # production said exactly this already: the failure was about something else
            common = problems_of[intent].most_common(1)
            out.samples.append(
                Generated(
                    generator=NAME,
                    params={"k": cfg.mining_k, "agreement": round(agreement, 4), "nearest": round(nearest, 4)},
                    source_id=interaction.id,
                    source_text=None,  # the query is the source itself: no similarity-to-source check
                    intent=intent,
                    problem_type=common[0][0] if common else "synthetic",
                    messages=interaction.prompt_messages(),
                    answer=answers[intent],
                    rejected=_logged_answer(interaction),
                )
            )
    return out


def _logged_answer(interaction: Interaction) -> str | None:
    answer = interaction.last_assistant()
    return (answer.content or None) if answer is not None and not answer.tool_calls else None
