"""The demo's simulated people and traffic, which the loop reaches through hooks.

The loop itself (triage, label, judge, correct, build, train, evaluate, canary, approval, promotion,
graduation) is flywheel's own code. Only what a deployment gets from the outside world is simulated
here: a person who labels failures (answering from the dataset's labels, within the labelling budget),
and the users who talk to the canary while it runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flywheel.context import Context
from flywheel.data.ingest import ingest_files
from flywheel.data.labelling import LabelRequest
from flywheel.data.replies import build_reply_book
from flywheel.data.triage import triage
from flywheel.demo.pack import DemoPack, Row
from flywheel.demo.production import user_of
from flywheel.demo.setup import serve_traffic
from flywheel.evals.rule_judge import RuleJudge
from flywheel.inference.local_model import LocalModel
from flywheel.release.registry import resolve
from flywheel.store.failures import get_failures

Say = Callable[[str], None]


class TruthLabeller:
    """Answers label requests from the dataset's own labels, as a careful person would.

    - The model already gave the right intent, in an answer that breaks no policy: "fine".
    - Otherwise the right intent. With `answers` (the pack's replies per intent, given when the pack has
      no knowledge base), the person also writes the answer for an intent flywheel knows no verified
      reply for yet (flywheel.data.replies), as support staff do when the tool has nothing to offer.
    """

    name = "demo-labeller"

    def __init__(self, ctx: Context, truth: dict[str, str], answers: dict[str, str] | None = None):
        self.ctx = ctx
        self.truth = truth  # interaction id -> intent
        self.answers = answers
        self.rules = RuleJudge(ctx.settings)
        self.asked = 0

    def label(self, requests: Sequence[LabelRequest]) -> dict[str, dict[str, Any]]:
        ids = [r.failure_id for r in requests]
        with self.ctx.store.engine.connect() as conn:
            by_failure = {f.id: f.interaction_id for f in get_failures(conn, ids=ids)}
        self.asked += len(requests)
        shown = {r.failure_id: r for r in requests}
        intents = {self.truth[iid] for iid in by_failure.values() if iid in self.truth}
        book = build_reply_book(self.ctx.store, self.ctx.settings, intents) if self.answers is not None else None
        out: dict[str, dict[str, Any]] = {}
        for fid, iid in by_failure.items():
            if iid not in self.truth:
                continue
            right, request = self.truth[iid], shown[fid]
            if request.intent == right and not self.rules.check_answer(request.logged_answer):
                out[fid] = {"fine": True}
            elif self.answers is not None and right in self.answers and book is not None and book.for_intent(right) is None:
                out[fid] = {"intent": right, "answer": self.answers[right]}
            else:
                out[fid] = {"intent": right}
        return out


class CanaryTraffic:
    """Users arriving while a canary runs: each is routed sticky by user id (the same rule the gateway
    uses) to the champion or the canary, answered by that model, and their signals are logged, ingested
    and captured like any other traffic."""

    def __init__(self, ctx: Context, pack: DemoPack, rows: list[Row], workdir: Path, seed: int, truth: dict[str, str]):
        self.ctx, self.pack, self.rows, self.workdir, self.seed, self.truth = ctx, pack, rows, workdir, seed, truth

    def __call__(self, canary_version: str, share: float, say: Say) -> dict[str, int]:
        champion = resolve(self.ctx.store, "champion")
        canary = resolve(self.ctx.store, canary_version)
        to_canary = [r for r in self.rows if _bucket(user_of(r)) < share]
        to_champion = [r for r in self.rows if _bucket(user_of(r)) >= share]
        log = self.workdir / "logs" / f"canary-{canary_version}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        model = LocalModel(champion.base_model)
        if canary.adapter_path:
            model.load_adapter(canary.id, canary.adapter_path, expected_sha256=canary.adapter_sha256)
        if champion.adapter_path:
            model.load_adapter(champion.id, champion.adapter_path, expected_sha256=champion.adapter_sha256)
        say(f"canary: {len(to_canary)} requests to {canary.id}, {len(to_champion)} to {champion.id}")
        settings = self.ctx.settings
        self.truth.update(
            serve_traffic(
                model,
                to_champion,
                self.pack,
                settings,
                log,
                version=champion.id,
                seed=self.seed + 1,
                adapter=champion.id if champion.adapter_path else None,
            )
        )
        self.truth.update(
            serve_traffic(model, to_canary, self.pack, settings, log, version=canary.id, seed=self.seed + 2, adapter=canary.id)
        )
        summary = ingest_files(self.ctx.store, settings, [log])
        captured = triage(self.ctx)
        return {
            "champion_requests": len(to_champion),
            "canary_requests": len(to_canary),
            "stored": summary.stored,
            "captured": captured.captured,
        }


def _bucket(user_id: str) -> float:
    """A stable number in [0, 1) per user: the same user always lands on the same side."""
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big") / 2**64
