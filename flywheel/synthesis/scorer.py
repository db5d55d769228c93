"""The quality scorer: every generated sample is scored, and only those that pass every check are kept.

Checks, in the order a dropped sample's reasons list them (a sample carries every check it failed):

    empty             no user text or no answer
    exact_duplicate   the same (normalised) user turn with the same answer is already in the pool, or
                      earlier in this batch
    test_set_leak     the user turn equals a fixed-test-set prompt after normalisation, or its cosine
                      to one is at least `leak_threshold`: a test prompt never enters training
    near_duplicate    cosine to its source at least `dedupe_threshold` (a copy with a typo nobody would
                      make), or to a pool prompt of the same intent
    drift             cosine to its source below `drift_floor`: the rewrite no longer asks the same thing
    rule_judge        the rule judge finds a problem in the answer (schema, policy patterns, intent)
    label_inconsistent  the intent the `knn_k` nearest verified samples vote for is not the sample's
    perplexity_high / perplexity_low  of the answer under the champion, outside
                      [min_perplexity, max_perplexity]: garbage, or a copy of what it already says
    preference        the predictor trained on people's decisions gives it less than
                      `preference_min_probability` of being accepted
    llm_verifier      online (llm.base_url), the verifier model judges the answer wrong for the turn

The expensive checks (perplexity, preference, the LLM verifier) run only on samples the cheap ones kept. Scores are
stored with each sample, whatever became of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flywheel.records import Reference
from flywheel.settings import Settings
from flywheel.synthesis.mining import vote
from flywheel.synthesis.records import Generated, Scored, Seed
from flywheel.trainer.samples import normalise_text

Embed = Callable[[Sequence[str]], np.ndarray]
Perplexity = Callable[[Sequence[Generated]], list[float]]  # the answer's perplexity under the champion, per sample
Preference = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (user texts, answers) -> P(a person accepts)
Verify = Callable[[Sequence[Generated]], list[str | None]]  # the LLM verifier: per sample, why it is wrong, or None
_TOOL_KINDS = ("tool_choice", "tool_arguments")  # their answers are tool JSON, not the product's output schema


@dataclass
class Pool:
    """What the samples are compared against: the training pool and the fixed test set."""

    keys: set[tuple[str, str]] = field(default_factory=set)  # (normalised user turn, answer) already trained on
    texts: list[str] = field(default_factory=list)  # pool user turns, for near-duplicates
    intents: list[str] = field(default_factory=list)
    test_texts: list[str] = field(default_factory=list)  # fixed-test-set user turns (last turn of each)
    test_keys: set[str] = field(default_factory=set)  # normalised test prompts (all user turns, and the last one)
    reference: list[Seed] = field(default_factory=list)  # verified samples a person vouched for (label consistency)


@dataclass
class Scorer:
    settings: Settings
    embed: Embed
    rule_judge: Any  # flywheel.evals.rule_judge.RuleJudge
    perplexity: Perplexity | None = None
    preference: Preference | None = None
    verify: Verify | None = None  # online only (llm.base_url): flywheel.synthesis.llm_verify

    def score(self, samples: Sequence[Generated], pool: Pool) -> list[Scored]:
        cfg = self.settings.synthesis
        unique = list({s.id: s for s in samples}.values())
        if not unique:
            return []
        texts = [s.last_user() for s in unique]
        vectors = self.embed(texts)
        sources = [s.source_text or "" for s in unique]
        with_source = [i for i, t in enumerate(sources) if t.strip()]
        source_vectors = self.embed([sources[i] for i in with_source]) if with_source else np.zeros((0, vectors.shape[1]))
        source_sim = {i: float(vectors[i] @ source_vectors[n]) for n, i in enumerate(with_source)}
        test_sim = _max_similarity(vectors, self.embed(pool.test_texts) if pool.test_texts else None)
        pool_sim = _max_similarity_same_intent(
            vectors, [s.intent for s in unique], self.embed(pool.texts) if pool.texts else None, pool.intents
        )
        ref_vectors = self.embed([r.last_user() for r in pool.reference]) if pool.reference else None
        ref_intents = [r.intent for r in pool.reference]
        known_intents = set(ref_intents)

        seen = set(pool.keys)
        out: list[Scored] = []
        for i, sample in enumerate(unique):
            reasons: list[str] = []
            scores: dict[str, float | str | None] = {}
            key = normalise_text(texts[i])
            if not key or not sample.answer.strip():
                reasons.append("empty: no user text or no answer")
            if (key, sample.answer) in seen:
                reasons.append("exact_duplicate: the same user turn and answer are already in the pool")
            seen.add((key, sample.answer))
            scores["test_similarity"] = _round(test_sim[i])
            if key in pool.test_keys or test_sim[i] >= cfg.leak_threshold:
                reasons.append(f"test_set_leak: {'equals' if key in pool.test_keys else 'near'} a fixed-test-set prompt")
            scores["source_similarity"] = _round(source_sim.get(i))
            scores["pool_similarity"] = _round(pool_sim[i])
            if i in source_sim and source_sim[i] >= cfg.dedupe_threshold:
                reasons.append(f"near_duplicate: cosine {source_sim[i]:.3f} to its source")
            elif pool_sim[i] >= cfg.dedupe_threshold:
                reasons.append(f"near_duplicate: cosine {pool_sim[i]:.3f} to a pool prompt of the same intent")
            if i in source_sim and source_sim[i] < cfg.drift_floor:
                reasons.append(f"drift: cosine {source_sim[i]:.3f} to its source, below {cfg.drift_floor}")
            findings = self._rule_findings(sample)
            scores["rule_findings"] = len(findings)
            if findings:
                reasons.append(f"rule_judge: {findings[0]}")
            if sample.kind == "reply" and ref_vectors is not None and sample.intent in known_intents:
                predicted, share, _nearest = vote(ref_vectors @ vectors[i], ref_intents, cfg.knn_k)
                scores["knn_intent"], scores["knn_agreement"] = predicted, round(share, 4)
                if predicted != sample.intent:
                    reasons.append(f"label_inconsistent: the nearest verified samples say {predicted!r}")
            out.append(Scored(id=sample.id, sample=sample, scores=scores, kept=not reasons, reasons=reasons))
        self._expensive([s for s in out if s.kept])
        return out

    def _rule_findings(self, sample: Generated) -> list[str]:
        reference = Reference(intent=sample.intent, source="synthesis") if sample.kind == "reply" else None
        findings = self.rule_judge.check_answer(sample.answer, reference)
        if sample.kind in _TOOL_KINDS:
            # a tool stage answers with tool JSON, which the product's output schema does not describe;
            # policy patterns still apply
            findings = [f for f in findings if f.check.startswith("policy:")]
        return [f"{f.check} ({f.problem_type})" + (f": {f.detail}" if f.detail else "") for f in findings]

    def _expensive(self, kept: list[Scored]) -> None:
        cfg = self.settings.synthesis
        if not kept:
            return
        if self.perplexity is not None:
            for scored, ppl in zip(kept, self.perplexity([s.sample for s in kept])):
                scored.scores["perplexity"] = _round(ppl)
                if ppl > cfg.max_perplexity:
                    scored.reasons.append(f"perplexity_high: {ppl:.1f} above {cfg.max_perplexity}")
                elif ppl < cfg.min_perplexity:
                    scored.reasons.append(f"perplexity_low: {ppl:.3f} below {cfg.min_perplexity}")
        if self.preference is not None:
            probs = self.preference([s.sample.last_user() for s in kept], [s.sample.answer for s in kept])
            for scored, p in zip(kept, probs):
                scored.scores["preference"] = _round(float(p))
                if p < cfg.preference_min_probability:
                    scored.reasons.append(f"preference: {float(p):.3f} below {cfg.preference_min_probability}")
        if self.verify is not None:
            # last and only on what every other check kept: it is the one check that costs an LLM call
            survivors = [s for s in kept if not s.reasons]
            for scored, problem in zip(survivors, self.verify([s.sample for s in survivors])):
                # "unverified": the endpoint or its replies failed; nobody vouched for the sample, so it is dropped too
                verdict = "accepted" if not problem else "rejected" if problem.startswith("rejected") else "unverified"
                scored.scores["llm_verifier"] = verdict
                if problem:
                    scored.reasons.append(f"llm_verifier: {problem}")
        for scored in kept:
            scored.kept = not scored.reasons


def reason_code(reason: str) -> str:
    """The filter's name at the head of a reason: "rule_judge", "drift", ..."""
    return reason.split(":", 1)[0]


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _max_similarity(vectors: np.ndarray, others: np.ndarray | None) -> list[float]:
    if others is None or len(others) == 0:
        return [0.0] * len(vectors)
    return [float(v) for v in (vectors @ others.T).max(axis=1)]


def _max_similarity_same_intent(
    vectors: np.ndarray, intents: Sequence[str], others: np.ndarray | None, other_intents: Sequence[str]
) -> list[float]:
    out = [0.0] * len(vectors)
    if others is None or len(others) == 0:
        return out
    rows_of: dict[str, list[int]] = {}
    for row, intent in enumerate(other_intents):
        rows_of.setdefault(intent, []).append(row)
    for i, intent in enumerate(intents):
        rows = rows_of.get(intent)
        if rows:
            out[i] = float((others[rows] @ vectors[i]).max())
    return out
