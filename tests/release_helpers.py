"""Builders shared by the release tests (registry, canary, graduation): adapter folders with real
safetensors weights, evaluated candidates, and production traffic with failures and verdicts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flywheel.records import Failure, FailureStatus, Interaction, Message, SampleTier, Signals, Verdict, utcnow
from flywheel.release import registry
from flywheel.release.records import ModelVersion
from flywheel.store.db import Store
from flywheel.store.failures import insert_failures, save_verdict
from flywheel.store.interactions import insert_ignore, to_row
from flywheel.store.schema import datasets


def make_adapter(folder: Path, seed: int) -> Path:
    """A PEFT-shaped adapter folder: a config and LoRA A/B matrices in safetensors; `seed` makes the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
            "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((16, 4), dtype=np.float32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}), encoding="utf-8")
    return folder


def candidate(
    store: Store, root: Path, seed: int, *, gate: bool = True, report_hash: str | None = None, dataset_id: str | None = None
) -> ModelVersion:
    """A registered, evaluated candidate version."""
    version = registry.register_version(
        store, base_model="tiny-base", adapter_path=make_adapter(root / f"adapter-{seed}", seed), dataset_id=dataset_id
    )
    return registry.attach_eval(
        store,
        version.id,
        report_path=str(root / f"report-{seed}.json"),
        report_hash=report_hash or f"{seed:064x}",
        gate_passed=gate,
        metrics={"task_success": 0.8, "targeted_problem_rates": {"over_promise": 0.05}},
    )


def interaction(interaction_id: str, version: str, when: datetime | None = None) -> Interaction:
    return Interaction(
        id=interaction_id,
        timestamp=when or utcnow(),
        model_version=version,
        user_id=f"u-{interaction_id}",
        messages=[Message(role="user", content=f"question {interaction_id}"), Message(role="assistant", content="answer")],
        signals=Signals(feedback="down"),
        content_hash=f"hash-{interaction_id}",
    )


def add_traffic(
    store: Store, version: str, total: int, problems: Sequence[str | None] = (), prefix: str = "", when: datetime | None = None
) -> list[str]:
    """`total` interactions served by `version`; the first len(problems) of them failed. Each entry of
    `problems` is a problem type (judged failure), None (captured, not yet judged) or "cleared" (the
    judge found nothing wrong). Returns the failure ids."""
    assert len(problems) <= total
    prefix = prefix or f"{version}-"
    items = [interaction(f"{prefix}{i}", version, when) for i in range(total)]
    failure_ids = []
    with store.begin() as conn:
        insert_ignore(conn, [to_row(i) for i in items])
        rows = [
            Failure(id=f"f-{prefix}{i}", interaction_id=items[i].id, rule="thumbs_down", rules=["thumbs_down"], first_seen_version=version)
            for i in range(len(problems))
        ]
        insert_failures(conn, rows)
        for failure, problem in zip(rows, problems):
            failure_ids.append(failure.id)
            if problem is None:
                continue
            cleared = problem == "cleared"
            save_verdict(
                conn,
                Verdict(
                    failure_id=failure.id,
                    is_failure=not cleared,
                    problem_type=None if cleared else problem,
                    severity=None if cleared else "medium",
                    judge="rule",
                ),
            )
    return failure_ids


def add_samples(store: Store, ids: Sequence[str], tier: SampleTier = SampleTier.PROBLEM, weight: float = 1.0) -> None:
    """Verified failures (with their interactions) sitting in `tier`."""
    items = [interaction(f"i-{fid}", "v1", utcnow() - timedelta(days=1)) for fid in ids]
    with store.begin() as conn:
        insert_ignore(conn, [to_row(i) for i in items])
        insert_failures(
            conn,
            [
                Failure(
                    id=fid,
                    interaction_id=item.id,
                    rule="qa_reject",
                    first_seen_version="v1",
                    status=FailureStatus.VERIFIED,
                    tier=tier,
                    weight=weight,
                )
                for fid, item in zip(ids, items)
            ],
        )


def add_dataset(store: Store, dataset_id: str, failure_ids: Sequence[str]) -> None:
    with store.begin() as conn:
        conn.execute(
            datasets.insert().values(
                id=dataset_id,
                kind="sft",
                path=f"/data/{dataset_id}.jsonl",
                content_hash=dataset_id,
                manifest={"failure_ids": list(failure_ids), "rows": len(failure_ids)},
                created_at=utcnow(),
            )
        )
