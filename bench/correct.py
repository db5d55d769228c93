"""Benchmark: the correct stage, offline (knowledge-base corrector + rule verifier) and with an LLM
endpoint of fixed latency (LLM corrector + LLM verifier through the bounded runner).

Seeds N judged failures over 20 intents (a quarter of them without an approved response) into a fresh
SQLite store and a real Chroma index embedded with the packaged model, then runs `correct_failures`,
the function the CLI and the agent call. For the LLM run the local OpenAI-compatible test server
answers every call after `--delay` seconds; each failure takes two calls (corrector, verifier), so the
ceiling is max_in_flight / (2 * delay) failures per second.

    python bench/correct.py [--failures 400] [--delay 0.1] [--in-flight 16]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted server lives with the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

from openai_server import ChatRequest, OpenAIServer

from flywheel.context import Context
from flywheel.correct.stage import correct_failures
from flywheel.data.kb import KbEntry, KbSummary, add_entries
from flywheel.records import Failure, FailureStatus, Interaction, Message, Signals, Verdict
from flywheel.settings import load_settings
from flywheel.store import failures as failure_repo
from flywheel.store import interactions as interaction_repo

INTENTS = [f"intent_{n:02d}" for n in range(20)]
COVERED = INTENTS[:15]  # the other five have no approved response: uncorrectable offline


def seed(ctx: Context, n: int) -> None:
    entries = [
        KbEntry(
            id=f"ok-{i}",
            text=f"Here is how {i.replace('_', ' ')} works: follow the steps in the app.",
            intent=i,
            kind="approved_response",
            title=i,
        )
        for i in COVERED
    ]
    entries += [
        KbEntry(
            id=f"pol-{i}",
            text=f"Support cannot change {i.replace('_', ' ')} outcomes. Ask the issuer.",
            intent=i,
            kind="policy",
            title=f"{i} policy",
        )
        for i in INTENTS[::2]
    ]
    entries += [
        KbEntry(id=f"doc-{d}", text=f"Background document {d} about accounts, cards and transfers.", kind="doc", title=f"doc {d}")
        for d in range(30)
    ]
    add_entries(ctx.index, entries, KbSummary())
    items = []
    for k in range(n):
        intent = INTENTS[k % len(INTENTS)]
        items.append(
            Interaction(
                id=f"i{k}",
                timestamp="2026-01-01T00:00:00Z",
                model_version="v1",
                intent=intent,
                messages=[
                    Message(role="user", content=f"Question {k}: how does {intent.replace('_', ' ')} work for my account?"),
                    Message(role="assistant", content="No idea."),
                ],
                signals=Signals(feedback="down"),
                content_hash=f"h{k}",
            )
        )
    interaction_repo.insert(ctx.store, items)
    with ctx.store.begin() as conn:
        failure_repo.insert_failures(
            conn,
            [
                Failure(
                    id=f"f{k}",
                    interaction_id=i.id,
                    rule="thumbs_down",
                    first_seen_version="v1",
                    intent=i.intent,
                    status=FailureStatus.TRIAGED,
                )
                for k, i in enumerate(items)
            ],
        )
        for k in range(n):
            failure_repo.save_verdict(
                conn, Verdict(failure_id=f"f{k}", is_failure=True, problem_type="missing_knowledge", severity="medium", judge="rule")
            )


def run(n: int, llm: dict | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(Path(tmp), **({"llm": llm} if llm else {}))
        ctx = Context(settings=settings)
        try:
            seed(ctx, n)
            ctx.index.embedder.embed(["warm up"])  # model loading is not what we measure
            started = time.perf_counter()
            summary = correct_failures(ctx)
            seconds = time.perf_counter() - started
        finally:
            ctx.close()
    return {
        "failures": n,
        "seconds": round(seconds, 3),
        "per_second": round(n / seconds, 1),
        "verified": summary.verified,
        "uncorrectable": summary.uncorrectable,
        "corrected": summary.corrected,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--failures", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()

    offline = run(args.failures, None)
    print("offline", json.dumps(offline), flush=True)

    def handle(request: ChatRequest) -> dict:
        if request.response_format and request.response_format["json_schema"]["name"] == "Preference":
            return {"prefers": "correction", "reason": "it answers the question"}
        return {"answer": "Open the app, go to Settings and follow the steps shown there."}

    with OpenAIServer(handler=handle, delay_s=args.delay) as server:
        online = run(args.failures, {"base_url": server.base_url, "max_in_flight": args.in_flight})
        online["peak_in_flight"] = server.peak_in_flight
    ceiling = args.in_flight / (2 * args.delay)
    online["ceiling_per_second"] = round(ceiling, 1)
    online["share_of_ceiling"] = round(online["per_second"] / ceiling, 3)
    print("llm", json.dumps(online), flush=True)
    print(json.dumps({"bench": "correct", "delay_s": args.delay, "in_flight": args.in_flight, "offline": offline, "llm": online}))


if __name__ == "__main__":
    main()
