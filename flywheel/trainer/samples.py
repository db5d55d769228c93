"""Samples: what the store's corrected failures and the caller's replay rows become before balancing.

`store_samples` and `replay_samples` turn rows into `flywheel.trainer.balance.Sample`s, each with the
prompt keys (normalised user turns) the test-set filter and the held-out split compare; `test_set_keys`
gives the same keys for the fixed test set. flywheel.trainer.dataset builds a snapshot from them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flywheel.records import FailureStatus, Message, SampleTier, stable_hash
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.trainer.balance import Sample
from flywheel.trainer.replay import PRODUCTION_REPLAY_PREFIX, ReplayRow

NO_PROBLEM = "none"  # problem type of a replay row that never was a failure (a stable production sample)
UNCATEGORISED = "uncategorised"


# --- prompts, the test set ----------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def prompt_keys(messages: Sequence[Message | dict[str, Any]]) -> tuple[str, str]:
    """(all user turns, last user turn), normalised: what the test-set filter and the split compare."""
    users = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m.get("role"), m.get("content"))
        if role == "user" and content:
            users.append(normalise_text(content))
    return "\n".join(users), (users[-1] if users else "")


def test_set_path(settings: Settings) -> Path:
    """Where eval.test_set points, relative to the project folder unless absolute."""
    path = Path(settings.eval.test_set)
    return path if path.is_absolute() else settings.project_dir / path


def test_set_keys(settings: Settings) -> tuple[set[str], set[str], dict[str, Any] | None]:
    """Prompt keys of the fixed test set, and what the manifest says about it (None: none configured)."""
    if not settings.eval.test_set:
        return set(), set(), None
    from flywheel.evals.runner import load_test_set  # the one reader of the test set; strict on bad rows

    path = test_set_path(settings)
    items = load_test_set(path)
    groups, lasts = set(), set()
    for item in items:
        group, last = prompt_keys(item.messages)
        if group:
            groups.add(group)
        if last:
            lasts.add(last)
    return (groups, lasts, {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "items": len(items)})


# --- samples ------------------------------------------------------------------------------------------------


def _prompt_and_answer(messages: list[Message]) -> tuple[list[Message], Message | None]:
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    return (messages[:last], messages[last]) if last is not None else (list(messages), None)


def _dump(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in messages]


def origin_of(tier: str, labelled: bool, generator: str) -> str:
    """What a store row was built from, for the manifest's per-source accounting."""
    if tier != str(SampleTier.PROBLEM):
        return "baseline"
    if labelled:
        return "label"
    for prefix, name in (("kb", "kb_correction"), ("reply:", "reply_correction"), ("llm:", "llm_correction")):
        if generator.startswith(prefix):
            return name
    return "correction"


def store_samples(store: Store, settings: Settings) -> list[Sample]:
    """One sample per failure with a verified correction: tier problem and status verified (new fixes),
    or a baseline tier (graduated samples, whatever their status). Intents come from a human label when
    one exists, else the failure, else the interaction.

    Also one positive sample per failure a person's label confirmed (status not_failure with a label:
    "fine", or the intent the answer gave): the logged answer itself, as the lowest replay tier (origin
    label_fine). A person checked it, so it protects what already works as well as any baseline row."""
    from flywheel.data.labels import latest_labels
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo

    tax = settings.taxonomy
    out: list[Sample] = []
    with store.engine.connect() as conn:
        found = failure_repo.training_failures(conn)
        interactions = interaction_repo.get_many(conn, [f.interaction_id for f in found])
        labelled = latest_labels(conn, [f.id for f in found])
        ids = [f.id for f in found]
        # Bulk versions of failure_repo.latest_correction(verified_only=True) / latest_verdict: two queries
        # per 500 failures instead of two per failure (8,000 failures: 12 s -> 3 s on SQLite here).
        corrected = failure_repo.newest_corrections(conn, ids, verified_only=True)
        judged = failure_repo.newest_verdicts(conn, ids)
        for failure in found:
            interaction = interactions[failure.interaction_id]
            label = labelled.get(failure.id)
            prompt = interaction.prompt_messages()
            original = interaction.last_assistant()
            group, last = prompt_keys(prompt)
            if failure.status == FailureStatus.NOT_FAILURE and failure.tier == SampleTier.PROBLEM:
                if label is None or original is None or not (original.content or "").strip():
                    continue
                out.append(
                    Sample(
                        key=failure.id,
                        tier=str(SampleTier.CANDIDATE),
                        intent=label.intent or failure.intent or interaction.intent or "unknown",
                        problem_type=NO_PROBLEM,
                        severity=None,
                        category=UNCATEGORISED,
                        base_weight=failure.weight,
                        prompt=_dump(prompt),
                        answer=original.content or "",
                        rejected=None,
                        group=group,
                        last_user=last,
                        origin="label_fine",
                    )
                )
                continue
            correction = corrected.get(failure.id)
            if correction is None or not correction.answer.strip():
                continue  # graduated without a verified answer: nothing to train on
            verdict = judged.get(failure.id)
            problem_type = (verdict.problem_type if verdict else None) or "unknown"
            out.append(
                Sample(
                    key=failure.id,
                    tier=str(failure.tier),
                    intent=(label.intent if label else None) or failure.intent or interaction.intent or "unknown",
                    problem_type=problem_type,
                    severity=(verdict.severity if verdict else None) or tax.default_severity.get(problem_type),
                    category=tax.categories.get(problem_type, UNCATEGORISED),
                    base_weight=failure.weight,
                    prompt=_dump(prompt),
                    answer=correction.answer,
                    rejected=original.model_dump(exclude_none=True) if original is not None else None,
                    group=group,
                    last_user=last,
                    origin=origin_of(str(failure.tier), label is not None and not label.fine, correction.generator),
                )
            )
    return out


def replay_samples(rows: Sequence[ReplayRow], settings: Settings) -> list[Sample]:
    tax = settings.taxonomy
    out: list[Sample] = []
    for row in rows:
        prompt, answer = _prompt_and_answer(row.messages)
        problem_type = row.problem_type or NO_PROBLEM
        group, last = prompt_keys(prompt)
        key = "x-" + (row.id or stable_hash(row.model_dump(mode="json", exclude_none=True), 16))
        origin = "production_replay" if (row.id or "").startswith(PRODUCTION_REPLAY_PREFIX) else "extra"
        out.append(
            Sample(
                key=key,
                tier=str(row.tier),
                intent=row.intent or "unknown",
                problem_type=problem_type,
                severity=row.severity or tax.default_severity.get(problem_type),
                category=tax.categories.get(problem_type, UNCATEGORISED),
                base_weight=row.weight,
                prompt=_dump(prompt),
                answer=(answer.content or "") if answer else "",
                rejected={"role": "assistant", "content": row.rejected} if row.rejected else None,
                group=group,
                last_user=last,
                source="extra",
                origin=origin,
            )
        )
    return out


def synthetic_samples(store: Store, settings: Settings) -> list[Sample]:
    """One sample per generated sample the quality scorer kept (flywheel.synthesis), as problem rows of
    origin "synthetic:<generator>", weighted `synthesis.weight` below verified real samples. They are
    never baseline rows: graduation moves failures, and a generated sample is not one."""
    from flywheel.store import synthetic as synthetic_repo

    tax = settings.taxonomy
    out: list[Sample] = []
    with store.engine.connect() as conn:
        rows = synthetic_repo.kept(conn)
    for row in rows:
        prompt = [Message.model_validate(m) for m in row["messages"]]
        group, last = prompt_keys(prompt)
        problem_type = row["problem_type"]
        out.append(
            Sample(
                key=row["id"],
                tier=str(SampleTier.PROBLEM),
                intent=row["intent"],
                problem_type=problem_type,
                severity=tax.default_severity.get(problem_type),
                category=tax.categories.get(problem_type, UNCATEGORISED),
                base_weight=settings.synthesis.weight,
                prompt=_dump(prompt),
                answer=row["answer"],
                # the failing answer it corrects (mined rows): the replay mix protects its intent, DPO pairs it;
                # without one, DPO leaves the row out
                rejected={"role": "assistant", "content": row["rejected"]} if row.get("rejected") else None,
                group=group,
                last_user=last,
                source="synthetic",
                origin=f"synthetic:{row['generator']}",
            )
        )
    return out
