"""Triage over a large interaction table: capture, cluster and sample, timed, with peak memory.

    python bench/triage.py [--interactions 200000] [--failure-rate 0.02] [--budget 500] [--store URL]

Failures are built from 12 questions x 12 wrong answers (144 distinct mistakes) with varied order
numbers and greetings, so near-duplicate grouping has real work to do. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

from flywheel.context import Context
from flywheel.data.triage import triage
from flywheel.records import Interaction, Message, Signals, interaction_hash
from flywheel.settings import load_settings
from flywheel.store import interactions as interaction_repo

QUESTIONS = [
    "How do I reset my password?",
    "Where is my parcel for order {n}?",
    "Can I change my delivery address for order {n}?",
    "Do you ship to Canada?",
    "How do I cancel my subscription?",
    "My invoice {n} shows the wrong VAT number",
    "Is the blue jacket available in size M?",
    "Why was my card declined?",
    "Can I pay with PayPal?",
    "How long is the warranty on headphones?",
    "I want to upgrade my plan to premium",
    "I was charged twice for order {n}, can I get a refund?",
]
WRONG = [
    "Send me your current password and I will reset it.",
    "Your order was cancelled.",
    "We guarantee a full refund within 24 hours.",
    "Addresses can never be changed, sorry.",
    "We guarantee free express shipping everywhere forever.",
    "Subscriptions cannot be cancelled.",
    "Please buy a new laptop.",
    "Our store opens at nine.",
    "Your account has been deleted.",
    "We only accept cash sent by mail.",
    "Headphones are food items and cannot be returned.",
    "Please contact the police.",
]
GREETINGS = ["", "Hi, ", "Hello! ", "hey "]
SIGNALS = [
    {"feedback": "down"},
    {"escalated_to_human": True},
    {"followups": 3},
    {"qa_verdict": "Reject"},
    {"qa_verdict": "Risk"},
    {"complaint": "not helpful"},
    {"feedback": "down", "user_tier": "enterprise"},
]


def generate(count: int, failure_rate: float, seed: int = 0):
    rng = random.Random(seed)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for n in range(count):
        failing = rng.random() < failure_rate
        question = rng.choice(GREETINGS) + rng.choice(QUESTIONS).format(n=rng.randint(1000, 99999))
        answer = rng.choice(WRONG) if failing else "Here is how: open Settings and follow the steps."
        signals = rng.choice(SIGNALS) if failing else ({"feedback": "up"} if rng.random() < 0.3 else {})
        messages = [Message(role="user", content=question), Message(role="assistant", content=answer)]
        ts = t0 + timedelta(seconds=n)
        yield Interaction(
            id=f"i-{n:07d}",
            timestamp=ts,
            model_version=f"v{1 + n * 3 // count}",
            intent="support",
            user_id=f"u{n % 5000}",
            messages=messages,
            signals=Signals(**signals),
            content_hash=interaction_hash(messages, f"u{n % 5000}", ts.isoformat()),
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interactions", type=int, default=200_000)
    parser.add_argument("--failure-rate", type=float, default=0.02)
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--store", default="", help="a postgresql:// URL (default: SQLite in a temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"store": {"url": args.store}} if args.store else {}
        settings = load_settings(Path(tmp), **overrides)
        ctx = Context(settings=settings)
        started = time.perf_counter()
        batch: list[Interaction] = []
        for item in generate(args.interactions, args.failure_rate):
            batch.append(item)
            if len(batch) == 5000:
                interaction_repo.insert(ctx.store, batch)
                batch = []
        interaction_repo.insert(ctx.store, batch)
        load_s = time.perf_counter() - started
        ctx.index.embedder.embed(["warm up"])  # model load is not triage work
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        started = time.perf_counter()
        first = triage(ctx, budget=args.budget)
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        second = triage(ctx, budget=args.budget)
        second_s = time.perf_counter() - started
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ctx.index.close()
        ctx.close()

    result = {
        "bench": "triage",
        "store": "postgresql" if args.store else "sqlite",
        "interactions": args.interactions,
        "load_s": round(load_s, 1),
        "captured": first.captured,
        "clusters": first.clusters,
        "duplicates": first.duplicates,
        "taken": first.taken,
        "skipped": first.skipped,
        "triage_s": round(first_s, 2),
        "failures_per_s": round(first.captured / first_s, 1) if first_s else None,
        "rerun_s": round(second_s, 2),
        "rerun_captured": second.captured,
        "peak_rss_mb_before_triage": round(rss_before / 1024, 1),
        "peak_rss_mb_after_triage": round(rss_after / 1024, 1),
    }
    print(json.dumps(result), file=sys.stdout)


if __name__ == "__main__":
    main()
