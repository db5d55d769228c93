"""Ingest throughput and memory: generate N realistic interactions to a temp JSONL file, ingest it into a
fresh store through the same function the CLI calls (flywheel.data.ingest.ingest_files), and in the same run
write the same rows with the database's own bulk path (the raw baseline); print one JSON object.

    python bench/ingest.py --store sqlite          # 200,000 interactions, plus a 50,000 run for peak RSS
    python bench/ingest.py --store postgres        # a fresh database on 127.0.0.1:5432, dropped after
    python bench/ingest.py --rows 50000 --no-flatness
    python bench/ingest.py --serial                # one process parses, scrubs and writes
    python bench/ingest.py --parallel              # a helper process parses every other batch (default: a large file, 2+ cores)
    python bench/ingest.py --store-url postgresql://user@host/db   # an existing database, not dropped

The raw baseline: the same rows (read, scrubbed and turned into plain tuples beforehand, not timed), in
batches of the same size, one transaction each, into a fresh store with the same schema: sqlite3's
executemany of a plain INSERT, or psycopg's COPY straight into the table. Only those calls and the commits
are timed, so `ratio` (flywheel's rows/s over the raw rows/s) is the share of the database's own bulk speed
that the whole ingest (parsing, validating, scrubbing, duplicate handling) reaches.

Each measured run is its own child process, so its peak RSS belongs to that run alone; the file is written
before the child starts and is not counted in the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INTENTS = [
    "order_status",
    "refund",
    "shipping_change",
    "account_access",
    "billing_question",
    "tech_support",
    "cancel_subscription",
    "product_info",
]
TIERS = ["free", "free", "free", "pro", "pro", "enterprise", "premium"]
GREETINGS = ["Hi", "Hello", "Hey there", "Good morning", "Hi team", ""]
ASKS = {
    "order_status": [
        "Where is my order {order}? It was supposed to arrive on {date}.",
        "Can you check the status of order {order} please",
        "My package {order} hasn't moved since {date}.",
    ],
    "refund": [
        "I want a refund for order {order}, the item arrived broken.",
        "Please refund the {amount} you charged me twice on {date}.",
        "How long does a refund for {order} take?",
    ],
    "shipping_change": [
        "Can I change the delivery address for {order} to 42 Baker Street?",
        "Please ship {order} express instead, I need it before {date}.",
    ],
    "account_access": [
        "I can't log in, the reset link never arrives.",
        "My account is locked after too many attempts, help.",
        "How do I enable two-factor authentication?",
    ],
    "billing_question": [
        "Why was I charged {amount} on {date}?",
        "Your invoice {order} shows the wrong VAT number.",
        "Can I pay by bank transfer instead of card?",
    ],
    "tech_support": [
        "The app crashes on startup since version 4.2.1.",
        "Sync fails with error 0x80070005 on Windows.",
        "The export to CSV gives an empty file.",
    ],
    "cancel_subscription": ["Please cancel my subscription before the next billing date {date}.", "How do I stop the auto-renewal?"],
    "product_info": [
        "Does the X200 support USB-C charging?",
        "What is the warranty on the 65 inch model?",
        "Is the blue version back in stock?",
    ],
}
PII_TAILS = [
    " You can reach me at {email}.",
    " Call me on {phone} if needed.",
    " My card is {card}.",
    " Refund to IBAN {iban} please.",
    " My email is {email} and phone {phone}.",
    " Here is my API key {secret}, is it leaked?",
]
ANSWERS = [
    "Thanks for reaching out. I checked order {order}: it left our warehouse on {date} and should arrive within 2-3 business days.",
    "I'm sorry about the trouble. I've opened ticket {order} and a refund of {amount} will be processed within 5-7 business days.",
    "Here is what you can do: open Settings, choose Account, then Security, and follow the steps. Let me know if that works.",
    "I understand. I've updated your request; you'll receive a confirmation e-mail shortly. Is there anything else I can help with?",
    "Version 4.2.2 fixes that crash. Please update from the app store and restart the app; your data stays where it is.",
    "Your subscription is cancelled as of {date}. You keep access until the end of the current period and won't be charged again.",
]
SYSTEM = "You are the support assistant for ACME Corp. Be concise and friendly, never promise refunds you cannot issue, and use the tools to look up orders."


def _luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randint(0, 9) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i : i + 4] for i in range(0, 16, 4))


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        order=f"ORD-{rng.randint(100000, 999999)}",
        date=f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        amount=f"${rng.randint(5, 900)}.{rng.randint(0, 99):02d}",
        email=f"user{rng.randint(1, 99999)}@example.com",
        phone=f"+1 415-555-{rng.randint(0, 9999):04d}",
        card=_luhn_card(rng),
        iban="DE89 3704 0044 0532 0130 00",
        secret="sk-proj-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(32)),
    )


def make_interaction(i: int, rng: random.Random) -> dict:
    intent = rng.choice(INTENTS)
    ask = _fill(rng.choice(ASKS[intent]), rng)
    greeting = rng.choice(GREETINGS)
    user = f"{greeting}, {ask}" if greeting else ask
    if rng.random() < 0.15:
        user += _fill(rng.choice(PII_TAILS), rng)
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if intent in ("order_status", "refund", "shipping_change") and rng.random() < 0.7:
        order = f"ORD-{rng.randint(100000, 999999)}"
        call_id = f"call_{i}"
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": order})}}
                ],
            }
        )
        messages.append(
            {
                "role": "tool",
                "tool_call_id": call_id,
                "content": json.dumps(
                    {
                        "order_id": order,
                        "status": rng.choice(["shipped", "processing", "delivered"]),
                        "eta": f"2026-02-{rng.randint(1, 28):02d}",
                    }
                ),
            }
        )
    messages.append({"role": "assistant", "content": _fill(rng.choice(ANSWERS), rng)})
    if rng.random() < 0.2:  # a follow-up turn
        messages.append({"role": "user", "content": "That doesn't answer my question, can you check again?"})
        messages.append({"role": "assistant", "content": _fill(rng.choice(ANSWERS), rng)})
    record: dict = {
        "id": f"bench-{i}",
        "timestamp": f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}Z",
        "model_version": rng.choice(["v1", "v2", "v3"]),
        "intent": intent,
        "user_id": f"u{rng.randint(1, 50000)}",
        "messages": messages,
        "user_tier": rng.choice(TIERS),
    }
    roll = rng.random()
    if roll < 0.25:
        record["feedback"] = "up"
    elif roll < 0.35:
        record["feedback"] = "down"
    if rng.random() < 0.03:
        record["escalated_to_human"] = True
    if rng.random() < 0.15:
        record["followups"] = rng.randint(1, 4)
    if rng.random() < 0.1:
        record["qa_verdict"] = rng.choice(["Accept", "Risk", "Reject"])
    if rng.random() < 0.02:
        record["complaint"] = "The agent promised a refund and nothing happened. " + _fill(rng.choice(PII_TAILS), rng)
    return record


def write_file(path: Path, n: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps(make_interaction(i, rng)) + "\n")
    return path.stat().st_size


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _setup(store_url: str) -> tuple:
    """A fresh store in a temporary project (SQLite there, or the given PostgreSQL database), migrated."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flywheel.settings import load_settings
    from flywheel.store.db import open_store

    project = Path(tempfile.mkdtemp(prefix="flywheel-bench-ingest-"))
    settings = load_settings(project, **({"store": {"url": store_url}} if store_url else {}))
    return project, settings, open_store(settings)


def _memory(result: dict, rss_before: float) -> dict:
    helper = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["rss_before_mb"] = round(rss_before, 1)
    result["helper_peak_rss_mb"] = round(helper.ru_maxrss / 1024, 1)  # the process that parses every other batch (0: none)
    result["cpu_seconds_helper"] = round(helper.ru_utime + helper.ru_stime, 2)
    return result


def run_ingest(path: Path, store_url: str, parallel: bool | None) -> dict:
    """Runs in a fresh process: ingest `path` into a fresh store and measure."""
    project, settings, store = _setup(store_url)
    from flywheel.data.ingest import ingest_files
    from flywheel.store import interactions as repo

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_at_start = os.getloadavg()[0]
    cpu_start = time.process_time()
    start = time.perf_counter()
    summary = ingest_files(store, settings, [path], parallel=parallel)
    seconds = time.perf_counter() - start
    cpu_main = time.process_time() - cpu_start
    stored = repo.count(store)
    store.dispose()
    shutil.rmtree(project, ignore_errors=True)  # the store holds a few hundred MB
    f = summary.files[0]
    result = {
        "interactions": f.read,
        "stored": f.stored,
        "rows_in_store": stored,
        "quarantined": f.quarantined,
        "seconds": round(seconds, 3),
        "interactions_per_second": round(f.read / seconds),
        "cpu_seconds_main": round(cpu_main, 2),
        "load_average_1m_at_start": round(load_at_start, 2),
        "pii_replaced": f.pii,
    }
    result = _memory(result, rss_before)
    result["helper_process"] = result["cpu_seconds_helper"] > 0
    return result


def run_raw(path: Path, store_url: str) -> dict:
    """Runs in a fresh process: the same rows, in the same batches, through the database's own bulk path."""
    project, settings, store = _setup(store_url)
    from flywheel.data.batches import BatchReader
    from flywheel.data.ingest import BATCH_ROWS
    from flywheel.store.interactions import plan_for

    plan = plan_for(store.engine.dialect.name)
    names = ", ".join(f'"{name}"' for name in plan.names)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reader = BatchReader(path, "auto", settings.policies.max_message_chars, BATCH_ROWS, store.engine.dialect.name)
    seconds = cpu = 0.0
    rows = 0
    connection = store.engine.raw_connection()  # the store's own connection settings (SQLite: WAL, synchronous=NORMAL)
    try:
        cursor = connection.cursor()
        if store.is_sqlite:  # what ingest's bulk connection sets for the duration
            cursor.execute("PRAGMA cache_size=-32768")
            cursor.execute("PRAGMA wal_autocheckpoint=16384")
        insert = f"INSERT INTO interactions ({names}) VALUES ({', '.join('?' * len(plan.names))})"
        for batch in reader:
            values = [tuple(v) for v in batch.rows]
            started, cpu_started = time.perf_counter(), time.process_time()
            if store.is_sqlite:
                cursor.executemany(insert, values)
            else:
                with cursor.copy(f"COPY interactions ({names}) FROM STDIN") as copy:
                    for row in values:
                        copy.write_row(row)
            connection.commit()
            seconds += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
            rows += len(values)
        cursor.close()
    finally:
        connection.close()
        store.dispose()
        shutil.rmtree(project, ignore_errors=True)
    result = {"rows": rows, "seconds": round(seconds, 3), "rows_per_second": round(rows / seconds), "cpu_seconds": round(cpu, 2)}
    return _memory(result, rss_before)


@contextmanager
def fresh_database(store: str, store_url: str, admin_url: str) -> Iterator[str]:
    """The store URL for one measured run: "" (a fresh SQLite file in the child), the given URL, or a fresh
    PostgreSQL database created for the run and dropped after it."""
    if store == "sqlite" or store_url:
        yield store_url
        return
    import psycopg

    name = f"flywheel_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def child(kind: str, path: Path, store_url: str, mode: list[str]) -> dict:
    cmd = [sys.executable, __file__, f"--{kind}-child", str(path), "--store-url", store_url] + mode
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--rows", "--interactions", dest="rows", type=int, default=200_000)
    parser.add_argument("--store-url", default="", help="an existing database to use (emptied by nothing: give a fresh one)")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN, help="--store postgres: where to create the fresh databases")
    parser.add_argument("--no-flatness", action="store_true", help="skip the 50,000 run that shows memory does not grow with size")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw baseline")
    parser.add_argument("--serial", action="store_true", help="no helper process: parse, scrub and store in one process")
    parser.add_argument(
        "--parallel", "--helper", dest="parallel", action="store_true", help="share the parsing with a helper process (default: 2+ cores)"
    )
    parser.add_argument("--ingest-child", help=argparse.SUPPRESS)
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ingest_child:
        print(json.dumps(run_ingest(Path(args.ingest_child), args.store_url, False if args.serial else True if args.parallel else None)))
        return
    if args.raw_child:
        print(json.dumps(run_raw(Path(args.raw_child), args.store_url)))
        return
    if args.store_url:
        args.store = "postgres" if args.store_url.startswith("postgresql") else "sqlite"
    mode = ["--serial"] if args.serial else ["--parallel"] if args.parallel else []
    result: dict = {"store": args.store, "rows": args.rows, "mode": "serial" if args.serial else "parallel" if args.parallel else "auto"}
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as tmp:
        path = Path(tmp) / f"interactions-{args.rows}.jsonl"
        result["file_mb"] = round(write_file(path, args.rows) / 1e6, 1)
        with fresh_database(args.store, args.store_url, args.pg_admin_url) as url:
            ingest = child("ingest", path, url, mode)
        result["flywheel_rows_per_second"] = ingest["interactions_per_second"]
        if not args.no_raw:
            with fresh_database(args.store, args.store_url, args.pg_admin_url) as url:
                raw = child("raw", path, url, [])
            result["raw_rows_per_second"] = raw["rows_per_second"]
            result["ratio"] = round(ingest["interactions_per_second"] / raw["rows_per_second"], 3)
            result["raw"] = raw
        result["peak_rss_mb"] = ingest["peak_rss_mb"]
        if not args.no_flatness and args.rows > 50_000:
            small_path = Path(tmp) / "interactions-50000.jsonl"
            write_file(small_path, 50_000)
            with fresh_database(args.store, args.store_url, args.pg_admin_url) as url:
                small = child("ingest", small_path, url, mode)
            result["peak_rss_mb_by_rows"] = {"50000": small["peak_rss_mb"], str(args.rows): ingest["peak_rss_mb"]}
            result["helper_peak_rss_mb_by_rows"] = {"50000": small["helper_peak_rss_mb"], str(args.rows): ingest["helper_peak_rss_mb"]}
            result["flywheel_rows_per_second_50000"] = small["interactions_per_second"]
        result["flywheel"] = ingest
    result["cpu_count"] = os.cpu_count()
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
