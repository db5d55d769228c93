"""Benchmark: judge throughput against an LLM endpoint with a fixed latency.

The local OpenAI-compatible test server answers every judge call after a fixed delay (default 200 ms),
so the best possible rate with N calls in flight is N / delay judgments per second. This runs the real
stage (`judge_failures`: SQLite store, rule judge, langchain-openai, the bounded runner, verdict writes)
over freshly seeded triaged failures once per bound and reports how close it gets to that ceiling, and
the judge's own CPU time per judgment (the server runs in a child process so it does not share the GIL).
It also times the rule judge alone (what evaluation runs on every model answer), and, as a yardstick
for a busy machine, the bare openai client against the same server with the same bound.

    python bench/judge.py [--failures 400] [--delay 0.2] [--bounds 16 32]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the scripted server lives with the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import langchain_openai  # noqa: F401 - imported up front so that import time is not timed
from openai_server import OpenAIServer, Reply

from flywheel.context import Context
from flywheel.evals.judge import RuleJudge, judge_failures
from flywheel.records import Failure, FailureStatus, Interaction, Message, Signals
from flywheel.settings import load_settings
from flywheel.store import failures as failure_repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import open_store

VERDICT = {
    "is_failure": True,
    "problem_type": "missing_knowledge",
    "severity": "medium",
    "acceptance": "Risk",
    "rationale": "the delivery time is in the knowledge base",
}


def interactions(n: int) -> list[Interaction]:
    return [
        Interaction(
            id=f"i{i}",
            timestamp="2026-01-01T00:00:00Z",
            model_version="v1",
            intent="card_arrival",
            messages=[
                Message(role="system", content="You are a bank assistant."),
                Message(role="user", content=f"My card {i} has not arrived after two weeks, where is it?"),
                Message(role="assistant", content="Cards usually arrive soon. Is there anything else?"),
            ],
            signals=Signals(feedback="down"),
            content_hash=f"h{i}",
        )
        for i in range(n)
    ]


def _serve(delay_s: float, port_out, stop) -> None:
    """The fake endpoint, in its own process: its CPU must not compete with the judge for one GIL."""
    with OpenAIServer(handler=_verdict, delay_s=delay_s) as server:
        port_out.put(server.port)
        stop.wait()
        port_out.put(server.peak_in_flight)


def _verdict(req) -> Reply:
    return Reply.json(VERDICT)


def run_once(n: int, delay_s: float, in_flight: int) -> dict:
    ctx_mp = multiprocessing.get_context("fork")
    port_out, stop = ctx_mp.Queue(), ctx_mp.Event()
    server = ctx_mp.Process(target=_serve, args=(delay_s, port_out, stop), daemon=True)
    server.start()
    try:
        port = port_out.get(timeout=30)
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(
                tmp,
                llm={
                    "base_url": f"http://127.0.0.1:{port}/v1",
                    "judge_model": "bench-judge",
                    "max_in_flight": in_flight,
                    "timeout_s": 30.0,
                },
            )
            store = open_store(settings)
            items = interactions(n)
            interaction_repo.insert(store, items)
            with store.begin() as conn:
                failure_repo.insert_failures(
                    conn,
                    [
                        Failure(
                            id=failure_repo.failure_id_for(i.id),
                            interaction_id=i.id,
                            rule="thumbs_down",
                            first_seen_version="v1",
                            status=FailureStatus.TRIAGED,
                        )
                        for i in items
                    ],
                )
            ctx = Context(settings=settings, _store=store)
            started_cpu, started = time.process_time(), time.perf_counter()
            summary = judge_failures(ctx)
            seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
            ctx.close()
        raw_rate = asyncio.run(raw_client_rate(port, n, in_flight))
        stop.set()
        peak = port_out.get(timeout=30)
    finally:
        stop.set()
        server.join(timeout=10)
    if summary.failures != n:
        raise SystemExit(f"expected {n} verdicts, got {summary.model_dump()}")
    rate = n / seconds
    bound = in_flight / delay_s if delay_s > 0 else float("inf")
    return {
        "max_in_flight": in_flight,
        "seconds": round(seconds, 3),
        "judgments_per_second": round(rate, 1),
        "bound_per_second": round(bound, 1),
        "ratio": round(rate / bound, 3) if delay_s > 0 else None,
        "peak_in_flight": peak,
        "llm_calls": summary.llm_calls,
        "judge_cpu_ms_per_judgment": round(1000 * cpu / n, 2),  # the judge process only
        # the bare openai client, same server, same bound: what this machine allows right now
        "raw_client_calls_per_second": round(raw_rate, 1),
    }


async def raw_client_rate(port: int, n: int, in_flight: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    slots = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with slots:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}], response_format={"type": "json_object"}
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    rate = n / (time.perf_counter() - started)
    await client.close()
    return rate


def rule_judge_rate(n: int = 20_000) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        schema = {
            "type": "object",
            "properties": {"intent": {"type": "string"}, "reply": {"type": "string"}},
            "required": ["intent", "reply"],
        }
        judge = RuleJudge(load_settings(tmp, policies={"output_schema": schema, "allowed_tools": ["lookup_order"]}))
    sample = interactions(100)
    started = time.perf_counter()
    for k in range(n):
        judge.check(sample[k % 100])
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--bounds", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    runs = []
    for bound in args.bounds:
        result = run_once(args.failures, args.delay, bound)
        print(
            f"max_in_flight={bound}: {result['judgments_per_second']}/s of {result['bound_per_second']}/s bound (ratio {result['ratio']})",
            file=sys.stderr,
        )
        runs.append(result)
    print(
        json.dumps(
            {
                "bench": "judge",
                "failures": args.failures,
                "delay_s": args.delay,
                "runs": runs,
                "rule_judge_checks_per_second": round(rule_judge_rate(), 0),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
