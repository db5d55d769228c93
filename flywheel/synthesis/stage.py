"""`flywheel synthesize`: run the generators, score every sample, store them all with their provenance.

    synthesize(ctx, generators=None, dry_run=False) -> SynthesisSummary

1. Gather what generators read (`gather`): verified samples (the snapshot builder's own reading of the
   store), captured failures nobody labelled, stable tool-calling traffic, the knowledge base, and the
   intents that want samples: every known intent with fewer than `synthesis.min_verified` verified
   samples wants the difference.
2. Run each generator named (default `synthesis.generators`; "llm" only with `llm.base_url`). A
   generator's bad input (a malformed template, a KB triple missing a part, an LLM reply off schema) is
   reported with its source and skipped; the other generators still run.
3. Scrub generated text with the same PII scrubber ingest uses: generated text is untrusted like logs.
4. Score (flywheel.synthesis.scorer) against the training pool, the fixed test set, the verified
   samples, the champion's perplexity and the preference predictor.
5. Store every sample, kept or dropped, in `synthetic_samples` (not with `dry_run`). Ids are content
   hashes, so the same inputs, seed and settings add nothing on a second run.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from flywheel.context import Context
from flywheel.records import Message, Record
from flywheel.synthesis import registry
from flywheel.synthesis.mining import trusted
from flywheel.synthesis.records import Generated, GeneratorProblem, Scored, Seed, SynthesisInputs
from flywheel.synthesis.scorer import Perplexity, Pool, Scorer, reason_code
from flywheel.trainer.samples import normalise_text

SHOWN_PROBLEMS = 50


class GeneratorCounts(Record):
    generated: int = 0
    kept: int = 0
    dropped: dict[str, int] = {}  # filter -> samples it dropped (a sample counts under its first reason)
    problems: int = 0  # bad inputs reported and skipped
    seconds: float = 0.0


class SynthesisSummary(Record):
    dry_run: bool
    generators: dict[str, GeneratorCounts]
    wants: dict[str, int]  # intent -> samples it wants (short of synthesis.min_verified)
    generated: int
    kept: int
    new: int  # rows new to the store (0 on a dry run, and on a repeated run)
    problems: list[GeneratorProblem]  # the first SHOWN_PROBLEMS
    problem_count: int
    perplexity: str  # "champion vN" or why it was not scored
    preference: dict[str, Any]  # decisions seen and whether the predictor ran
    seconds: float


def synthesize(
    ctx: Context, generators: Sequence[str] | None = None, *, dry_run: bool = False, perplexity: Perplexity | None = None
) -> SynthesisSummary:
    """Generate, score and (unless `dry_run`) store. `perplexity` replaces the champion's (tests)."""
    started = time.monotonic()
    settings = ctx.settings
    names = registry.check_names(list(generators or settings.synthesis.generators))
    if not settings.llm.enabled:
        names = [n for n in names if n != "llm"]
    inputs = gather(ctx)
    counts: dict[str, GeneratorCounts] = {}
    samples: list[Generated] = []
    problems: list[GeneratorProblem] = []
    for name in names:
        t = time.monotonic()
        output = registry.get(name)(inputs)
        samples.extend(_scrubbed(output.samples))
        problems.extend(output.problems)
        counts[name] = GeneratorCounts(generated=len(output.samples), problems=len(output.problems), seconds=round(time.monotonic() - t, 2))

    perplexity_note = "given by the caller"
    if perplexity is None:
        perplexity, perplexity_note = champion_perplexity(ctx)
    from flywheel.evals.rule_judge import RuleJudge
    from flywheel.synthesis.preference import train_preference

    assert inputs.embed is not None  # gather always sets it
    preference, decisions = train_preference(ctx.store, settings, inputs.embed)
    verify = None
    if settings.llm.enabled:
        from flywheel.synthesis.llm_verify import llm_verifier

        verify = llm_verifier(settings)
    scorer = Scorer(settings, inputs.embed, RuleJudge(settings), perplexity=perplexity, preference=preference, verify=verify)
    scored = scorer.score(samples, build_pool(ctx, inputs.seeds))
    for item in scored:
        entry = counts[item.sample.generator]
        if item.kept:
            entry.kept += 1
        else:
            code = reason_code(item.reasons[0])
            entry.dropped = {**entry.dropped, code: entry.dropped.get(code, 0) + 1}
    new = 0 if dry_run else _store(ctx, scored)
    return SynthesisSummary(
        dry_run=dry_run,
        generators=counts,
        wants=inputs.wants,
        generated=len(scored),
        kept=sum(s.kept for s in scored),
        new=new,
        problems=problems[:SHOWN_PROBLEMS],
        problem_count=len(problems),
        perplexity=perplexity_note,
        preference={**decisions, "trained": preference is not None},
        seconds=round(time.monotonic() - started, 2),
    )


# --- inputs -------------------------------------------------------------------------------------------------


def verified_seeds(ctx: Context) -> list[Seed]:
    """The snapshot builder's own reading of the store's verified samples, as generator seeds."""
    from flywheel.trainer.samples import store_samples

    return [
        Seed(
            id=s.key,
            intent=s.intent,
            problem_type=s.problem_type,
            messages=[Message.model_validate(m) for m in s.prompt],
            answer=s.answer,
            origin=s.origin,
        )
        for s in store_samples(ctx.store, ctx.settings)
        if s.answer.strip()
    ]


def shortfall(ctx: Context) -> dict[str, int]:
    """Intents (by name) and problem types ("problem_type:<name>") with fewer verified samples than
    `synthesis.min_verified`, and how many they lack. Problem types count only those seen in the
    verified samples: a type nobody found needs no samples."""
    seeds = verified_seeds(ctx)
    need = ctx.settings.synthesis.min_verified
    short = wants(ctx.settings, seeds, kb_entries(ctx))
    by_type = Counter(s.problem_type for s in seeds if s.problem_type not in ("none", "unknown"))
    short.update({f"problem_type:{t}": need - n for t, n in sorted(by_type.items()) if n < need})
    return short


def kb_entries(ctx: Context) -> list[dict[str, Any]]:
    return [_kb_entry(hit) for hit in ctx.index.get("kb")]


def gather(ctx: Context) -> SynthesisInputs:
    from flywheel.data.labels import latest_labels
    from flywheel.data.stable import stable_answers
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo

    settings = ctx.settings
    seeds = verified_seeds(ctx)
    with ctx.store.engine.connect() as conn:
        found = [f for f in failure_repo.get_failures(conn) if f.tier == "problem"]
        labelled = latest_labels(conn, [f.id for f in found])
        open_ids = sorted({f.interaction_id for f in found if f.id not in labelled})
        unlabelled = list(interaction_repo.get_many(conn, open_ids).values())
    stable = stable_answers(ctx.store, settings, settings.dataset.production_replay_rows or 2000)
    tool_interactions = [i for i in stable if any(m.tool_calls for m in i.messages)]
    kb = kb_entries(ctx)
    return SynthesisInputs(
        settings=settings,
        seeds=seeds,
        unlabelled=sorted(unlabelled, key=lambda i: i.id),
        tool_interactions=tool_interactions,
        stable=stable,
        kb=kb,
        embed=ctx.index.embedder.embed,
        chat_model=_chat_model(ctx),
        wants=wants(settings, seeds, kb),
        seed=settings.synthesis.seed,
    )


def wants(settings: Any, seeds: Sequence[Seed], kb: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Every known intent short of `synthesis.min_verified` verified samples, and by how many. Known:
    named by the output schema's intent enum, a verified sample or a KB entry."""
    have = Counter(s.intent for s in seeds if s.intent not in ("unknown", ""))
    known = set(have) | {e["intent"] for e in kb if e.get("intent")} | set(_schema_intents(settings))
    need = settings.synthesis.min_verified
    return {intent: need - have[intent] for intent in sorted(known) if have[intent] < need}


def _schema_intents(settings: Any) -> list[str]:
    schema = settings.policies.output_schema or {}
    intent = (schema.get("properties") or {}).get("intent") or {}
    return [v for v in intent.get("enum") or [] if isinstance(v, str)]


def _kb_entry(hit: Any) -> dict[str, Any]:
    meta = hit.metadata
    return {
        "id": hit.id,
        "text": hit.text,
        "kind": meta.get("kind", "doc"),
        "intent": meta.get("intent"),
        "title": meta.get("title", ""),
        "head": meta.get("head"),
        "relation": meta.get("relation"),
        "tail": meta.get("tail"),
        "source": meta.get("source", ""),
    }


def _chat_model(ctx: Context) -> Any:
    if not ctx.settings.llm.enabled:
        return None
    from flywheel.llm import chat_model

    # the corrector's model: generating a sample is writing an answer, as correcting one is
    return chat_model(ctx.settings, ctx.settings.llm.corrector_model)


def build_pool(ctx: Context, seeds: Sequence[Seed]) -> Pool:
    """The training pool (verified samples) and the fixed test set, as the scorer compares them."""
    from flywheel.trainer.samples import prompt_keys

    pool = Pool(reference=trusted(seeds))
    for seed in seeds:
        pool.keys.add((normalise_text(seed.last_user()), seed.answer))
        pool.texts.append(seed.last_user())
        pool.intents.append(seed.intent)
    for messages in _test_prompts(ctx):
        group, last = prompt_keys(messages)
        pool.test_keys.update(k for k in (group, last) if k)
        text = next((m.content or "" for m in reversed(messages) if m.role == "user"), "")
        if text.strip():
            pool.test_texts.append(text)
    return pool


def _test_prompts(ctx: Context) -> list[list[Message]]:
    if not ctx.settings.eval.test_set:
        return []
    from flywheel.evals.runner import load_test_set
    from flywheel.trainer.samples import test_set_path

    return [list(item.messages) for item in load_test_set(test_set_path(ctx.settings))]


# --- scoring helpers ----------------------------------------------------------------------------------------


def champion_perplexity(ctx: Context) -> tuple[Perplexity | None, str]:
    """The answer's perplexity under the champion, or None and why it cannot be scored."""
    from flywheel.errors import FlywheelError
    from flywheel.release.registry import resolve

    try:
        champion = resolve(ctx.store, "champion")
    except FlywheelError as exc:
        return None, f"not scored: {exc}"
    try:
        from flywheel.inference.local_model import LocalModel

        model = LocalModel(champion.base_model, champion.adapter_path)
    except (FlywheelError, OSError, ValueError) as exc:
        return None, f"not scored: the champion {champion.id} could not be loaded: {exc}"

    def perplexity(samples: Sequence[Generated]) -> list[float]:
        conversations = [[m.model_dump(exclude_none=True) for m in s.messages] for s in samples]
        answers = [s.answer for s in samples]
        totals = model.sequence_logprob(conversations, answers, batch_size=32)
        lengths = [len(model.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]  # + the end-of-turn token
        return [math.exp(min(-t / n, 50.0)) for t, n in zip(totals, lengths)]

    return perplexity, f"champion {champion.id}"


def _scrubbed(samples: Sequence[Generated]) -> list[Generated]:
    from flywheel.data.pii import Scrubber

    scrub = Scrubber()
    out = []
    for s in samples:
        messages = [m.model_copy(update={"content": scrub.text(m.content)}) if m.content else m for m in s.messages]
        rejected = scrub.text(s.rejected) if s.rejected else s.rejected
        out.append(s.model_copy(update={"messages": messages, "answer": scrub.text(s.answer), "rejected": rejected}))
    return out


def _store(ctx: Context, scored: Sequence[Scored]) -> int:
    from flywheel.store import synthetic as synthetic_repo

    rows = [
        {
            "id": s.id,
            "generator": s.sample.generator,
            "params": s.sample.params,
            "source_id": s.sample.source_id,
            "intent": s.sample.intent,
            "problem_type": s.sample.problem_type,
            "kind": s.sample.kind,
            "messages": [m.model_dump(exclude_none=True) for m in s.sample.messages],
            "answer": s.sample.answer,
            "rejected": s.sample.rejected,
            "scores": s.scores,
            "kept": s.kept,
            "reasons": s.reasons,
        }
        for s in scored
    ]
    return synthetic_repo.upsert(ctx.store, rows)
