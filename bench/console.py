"""Console page render time with 100k failures in the store: p50/p99 over 200 requests per page.

    python bench/console.py [--failures 100000] [--requests 200] [--store-url postgresql://...]

Fills a fresh project's store with `--failures` interactions, failures and verdicts through the store
layer (flywheel.store.interactions.insert, flywheel.store.failures.insert_failures / save_verdict),
starts the console with uvicorn on a free loopback port, logs in with a console user's token, and times
GET requests one after another: the overview, the first page of the failures list, a filtered page
(problem type + intent), the 100th page (reached through the "next page" links) and a pending approval.
Before that it gives the project a history, so the overview has something to draw: `--versions` champions
in a row, each with an eval report over the 40 intents and 6 problem types, approved and promoted through
the approval path, and one more candidate waiting for a decision. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PROBLEM_TYPES = ["wrong_intent", "format_error", "missing_knowledge", "over_promise", "policy_boundary_risk", "wrong_tool_call"]
INTENTS = [f"intent_{i:02d}" for i in range(40)]
RULES = ["thumbs_down", "escalation", "qa_reject", "complaint", "followups"]


def fill(store, count: int, batch: int = 5000) -> float:
    """`count` interactions, each with a judged failure; returns the seconds it took."""
    from flywheel.records import Failure, FailureStatus, Interaction, Message, Signals, Verdict
    from flywheel.store import failures as failure_repo
    from flywheel.store import interactions as interaction_repo

    started = time.perf_counter()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for start in range(0, count, batch):
        items, fails, verdicts = [], [], []
        for n in range(start, min(start + batch, count)):
            intent = INTENTS[n % len(INTENTS)]
            interaction = Interaction(
                id=f"bench-{n}",
                timestamp=base + timedelta(seconds=n),
                model_version=f"v{1 + n % 3}",
                intent=intent,
                messages=[
                    Message(role="user", content=f"question {n} about {intent}"),
                    Message(role="assistant", content=f'{{"intent": "{intent}", "reply": "answer {n}"}}'),
                ],
                signals=Signals(feedback="down"),
                content_hash=f"{n:064d}",
                source="bench",
            )
            items.append(interaction)
            fid = failure_repo.failure_id_for(interaction.id)
            fails.append(
                Failure(
                    id=fid,
                    interaction_id=interaction.id,
                    rule=RULES[n % len(RULES)],
                    rules=[RULES[n % len(RULES)]],
                    risk=float(n % 997),
                    first_seen_version=interaction.model_version,
                    intent=intent,
                    status=FailureStatus.TRIAGED,
                )
            )
            verdicts.append(
                Verdict(
                    failure_id=fid, is_failure=True, problem_type=PROBLEM_TYPES[n % len(PROBLEM_TYPES)], severity="medium", judge="rule"
                )
            )
        interaction_repo.insert(store, items)
        with store.begin() as conn:
            failure_repo.insert_failures(conn, fails)
            for verdict in verdicts:
                failure_repo.save_verdict(conn, verdict)
    return time.perf_counter() - started


def history(ctx: Any, versions: int, folder: Path) -> str:
    """`versions` promoted champions after v1, each with a report, and one candidate left pending; returns its id."""
    from flywheel.evals.report import report_hash_of
    from flywheel.release import approvals, registry

    registry.first_champion(ctx.store, "bench-base", actor="bench")

    def rate(count: int, n: int) -> dict[str, Any]:
        return {"count": count, "n": n, "rate": count / n, "low": 0.0, "high": 1.0}

    def metrics(wrong: int) -> dict[str, Any]:
        return {
            "size": 400,
            "task_success": rate(400 - wrong, 400),
            "problem_rates": {name: rate(wrong // (k + 1), 400) for k, name in enumerate(PROBLEM_TYPES)},
            "per_intent": {intent: rate(10 - (wrong // 40) % 10, 10) for intent in INTENTS},
        }

    pending = ""
    for n in range(versions + 1):
        candidate = registry.register_version(ctx.store, base_model=f"bench-model-{n}")
        champion = registry.resolve(ctx.store, "champion").id
        report = folder / candidate.id / "report.json"
        report.parent.mkdir(parents=True)
        checks = [{"kind": "problem_type", "subject": name, "passed": True, "reason": f"{name} fell"} for name in PROBLEM_TYPES]
        document = {
            "candidate": {"name": candidate.id, "version": candidate.id},
            "champion": {"name": champion, "version": champion},
            "targeted": ["wrong_intent"],
            "champion_metrics": {"test": metrics(200 - 10 * n)},
            "candidate_metrics": {"test": metrics(190 - 10 * n)},
            "gate": {"passed": True, "reasons": ["wrong_intent fell"], "checks": checks},
        }
        report.write_text(json.dumps(document), encoding="utf-8")
        (report.parent / "report.html").write_text(f"<!doctype html><p>the report of {candidate.id}</p>", encoding="utf-8")
        registry.attach_eval(ctx.store, candidate.id, report_path=str(report), report_hash=report_hash_of(report), gate_passed=True)
        if n == versions:
            pending = candidate.id
            break
        approvals.record_approval(ctx.store, candidate.id, "approved", "bench", "terminal")
        approvals.promote(ctx.store, ctx.settings, candidate.id, actor="bench")
    return pending


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _login(client: Any, token: str) -> None:
    login = client.get("/login")
    csrf = login.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    answer = client.post("/login", data={"token": token, "csrf": csrf})
    if answer.status_code != 303:
        raise SystemExit(f"login failed: {answer.status_code} {answer.text[:200]}")


def deep_page(base_url: str, token: str, pages: int) -> str:
    """The URL of the failures list's page number `pages`, reached by following "next page" links."""
    import html

    import httpx

    url = "/failures"
    with httpx.Client(base_url=base_url, timeout=60) as client:
        _login(client, token)
        for _ in range(pages - 1):
            url = html.unescape(client.get(url).text.split('id="next" href="', 1)[1].split('"', 1)[0])
    return url


def time_pages(base_url: str, token: str, pages: dict[str, str], requests: int) -> dict[str, dict[str, float]]:
    import httpx

    out: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        _login(client, token)
        for name, path in pages.items():
            for _ in range(5):  # warm up
                client.get(path).raise_for_status()
            samples = []
            for _ in range(requests):
                began = time.perf_counter()
                response = client.get(path)
                samples.append(time.perf_counter() - began)
                response.raise_for_status()
            out[name] = {**_percentiles(samples), "bytes": len(response.content)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--versions", type=int, default=12, help="promoted champions in the project's history")
    parser.add_argument("--store-url", default="", help="default: SQLite in a temporary project")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

    from flywheel.console.app import build_app
    from flywheel.console.auth import create_user
    from flywheel.context import Context
    from flywheel.serve.server import ServerThread
    from flywheel.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="flywheel-console-bench-") as tmp:
        project = Path(tmp)
        (project / "flywheel.toml").write_text('[approvals]\napprovers = ["bench"]\n', encoding="utf-8")
        overrides = {"store": {"url": args.store_url}} if args.store_url else {}
        ctx = Context(settings=load_settings(project, **overrides))
        fill_s = fill(ctx.store, args.failures)
        pending = history(ctx, args.versions, project / "reports")
        token = create_user(ctx.store, "bench")
        pages = {
            "overview": "/",
            "approval": f"/approvals/{pending}",
            "failures": "/failures",
            "failures_filtered": f"/failures?problem_type={PROBLEM_TYPES[0]}&intent={INTENTS[6]}",
        }
        with ServerThread(build_app(ctx), name="flywheel-console", what="the console") as server:
            pages["failures_page_100"] = deep_page(server.url, token, 100)
            timings = time_pages(server.url, token, pages, args.requests)
        ctx.close()
    result = {
        "bench": "console",
        "store": "postgresql" if args.store_url else "sqlite",
        "failures": args.failures,
        "versions": args.versions,
        "requests_per_page": args.requests,
        "fill_s": round(fill_s, 1),
        "pages": timings,
        "p99_under_200ms": all(t["p99_ms"] < 200 for t in timings.values()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
