"""Benchmark: what evaluation costs beyond the model itself.

Two scripted "models" (a champion and a better candidate, no generation cost) answer a fixed test set
of N items over 77 intents plus problem and baseline sets; the benchmark times the rule judge and the
metrics over every answer (`evaluate_all`), the gate, and writing report.json + report.html, and reports
the report sizes. Model generation time is not included: it depends on the model, not on flywheel.

    python bench/eval.py [--items 3000]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from flywheel.evals.gate import evaluate_gate
from flywheel.evals.report import ModelRef, write_report
from flywheel.evals.rule_judge import RuleJudge
from flywheel.evals.runner import EvalItem, evaluate_all
from flywheel.records import Message, Reference
from flywheel.settings import load_settings

INTENTS = [f"intent_{i:02d}" for i in range(77)]
SCHEMA = {"type": "object", "required": ["intent", "answer"], "properties": {"intent": {"type": "string"}, "answer": {"type": "string"}}}


def items(prefix: str, n: int, rng: random.Random) -> list[EvalItem]:
    out = []
    for i in range(n):
        intent = rng.choice(INTENTS)
        out.append(
            EvalItem(
                id=f"{prefix}{i}",
                messages=[
                    Message(role="system", content="Answer as JSON."),
                    Message(role="user", content=f"[{intent}] question number {i}, please help"),
                ],
                reference=Reference(intent=intent, source="bench"),
                intent=intent,
            )
        )
    return out


def scripted(error_rate: float, seed: int):
    rng = random.Random(seed)

    def generate(conversations: list[list[dict]]) -> list[str]:
        answers = []
        for conv in conversations:
            intent = conv[-1]["content"][1:10]
            roll = rng.random()
            if roll < error_rate / 3:
                answers.append("plain text, not JSON")
            elif roll < 2 * error_rate / 3:
                answers.append(json.dumps({"intent": "intent_00" if intent != "intent_00" else "intent_01", "answer": "ok"}))
            elif roll < error_rate:
                answers.append(json.dumps({"intent": intent, "answer": "We guarantee a full refund by tomorrow."}))
            else:
                answers.append(json.dumps({"intent": intent, "answer": "Here is what our policy says about it."}))
        return answers

    return generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=3000)
    args = parser.parse_args()
    rng = random.Random(0)
    sets = {
        "test": items("t", args.items, rng),
        "problem": items("p", args.items // 10, rng),
        "baseline": items("b", args.items // 10, rng),
    }
    total = sum(len(v) for v in sets.values())
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(Path(tmp), policies={"output_schema": SCHEMA})
        judge = RuleJudge(settings)
        started = time.perf_counter()
        before = evaluate_all(scripted(0.30, 1), sets, judge, settings)
        after = evaluate_all(scripted(0.15, 2), sets, judge, settings)
        judged_s = time.perf_counter() - started
        started = time.perf_counter()
        gate = evaluate_gate(before, after, ["over_promise"], settings.gate)
        gate_s = time.perf_counter() - started
        started = time.perf_counter()
        report = write_report(
            settings, ModelRef(name="v2", base_model="/m", adapter_path="/a"), ModelRef(name="v1", base_model="/m"), before, after, gate
        )
        report_s = time.perf_counter() - started
        result = {
            "bench": "eval",
            "items_per_model": total,
            "judge_and_metrics_answers_per_s": round(2 * total / judged_s, 1),
            "gate_ms": round(gate_s * 1000, 2),
            "gate_checks": len(gate.checks),
            "report_write_s": round(report_s, 3),
            "report_json_kb": round(report.path_json.stat().st_size / 1024, 1),
            "report_html_kb": round(report.path_html.stat().st_size / 1024, 1),
            "gate_passed": gate.passed,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
