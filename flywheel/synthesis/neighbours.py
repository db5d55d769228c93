"""The "neighbours" generator: the other side of every boundary the other generators push on.

Generated rows go to intents short of verified samples. An intent the champion already answers well has
few failures, so few labels, and gets none; next to a short intent that gains dozens of rows, it loses
its share of the training set and its queries drift to the neighbour (measured in docs/synthesis.md:
getting_virtual_card 62.5% -> 15%, absorbed by get_disposable_virtual_card). This generator gives those
intents rows too: for each intent that wants samples, the `NEIGHBOURS` other intents whose stable
production queries lie nearest (cosine of the mean embeddings), and for each of those,
augment's variants of up to `synthesis.per_intent // synthesis.per_seed` of its stable answers, whose
answer is what production said without complaint.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from flywheel.synthesis.augment import variants
from flywheel.synthesis.records import GeneratorOutput, Seed, SynthesisInputs

NAME = "neighbours"
NEIGHBOURS = 2  # served intents protected per short intent
NO_PROBLEM = "none"


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    if inputs.embed is None or not inputs.wants:
        return GeneratorOutput()
    by_intent: dict[str, list[Seed]] = defaultdict(list)
    for item in sorted(inputs.stable, key=lambda i: i.id):
        answer, user = item.last_assistant(), item.last_user_text()
        if item.intent and answer is not None and (answer.content or "").strip() and user.strip() and not answer.tool_calls:
            by_intent[item.intent].append(
                Seed(
                    id=item.id,
                    intent=item.intent,
                    problem_type=NO_PROBLEM,
                    messages=item.prompt_messages(),
                    answer=answer.content or "",
                    origin="production",
                )
            )
    # every intent production answers without complaint; a short one can be another's neighbour too
    served = sorted(by_intent)
    short = sorted(i for i in inputs.wants if i in by_intent or any(s.intent == i for s in inputs.seeds))
    if not served or not short:
        return GeneratorOutput()
    centroid = {i: _centroid(inputs, [s.last_user() for s in by_intent[i]]) for i in served}
    for intent in short:
        texts = [s.last_user() for s in inputs.seeds if s.intent == intent] or [s.last_user() for s in by_intent[intent]]
        centroid[intent] = _centroid(inputs, texts)
    protected: set[str] = set()
    served_matrix = np.stack([centroid[i] for i in served])
    for intent in short:
        ranked = [served[n] for n in np.argsort(-(served_matrix @ centroid[intent])) if served[n] != intent]
        protected.update(ranked[:NEIGHBOURS])
    per_intent = max(1, inputs.settings.synthesis.per_intent // inputs.settings.synthesis.per_seed)
    seeds = [seed for intent in sorted(protected) for seed in by_intent[intent][:per_intent]]
    return GeneratorOutput(samples=variants(inputs, seeds, NAME))


def _centroid(inputs: SynthesisInputs, texts: list[str]) -> np.ndarray:
    assert inputs.embed is not None
    mean = np.asarray(inputs.embed(texts)).mean(axis=0)
    return mean / (np.linalg.norm(mean) or 1.0)
