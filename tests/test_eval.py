"""Evaluation: metrics, the three test sets, the runner with the triage rule judge, and `flywheel eval`
end to end on a tiny real model (base model vs. a scripted better model, and registered versions)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from openai_server import OpenAIServer, Reply, openai_server  # noqa: F401 - fixture

from flywheel.cli import main
from flywheel.context import Context
from flywheel.errors import InfrastructureError, UserInputError
from flywheel.evals.generate import local_generate_fn
from flywheel.evals.metrics import ItemOutcome, compute_metrics, wilson_interval
from flywheel.evals.report import ModelRef, report_hash_of
from flywheel.evals.rule_judge import RuleJudge
from flywheel.evals.runner import EvalItem, baseline_set, default_targeted, evaluate_model, load_test_set, problem_set, run_eval
from flywheel.records import Correction, Failure, FailureStatus, Finding, Interaction, Message, Reference, SampleTier, Verdict, Verification
from flywheel.settings import Settings, load_settings
from flywheel.store import failures as failure_repo
from flywheel.store import interactions as interaction_repo
from flywheel.store.db import Store

INTENTS = ["card_arrival", "refund_status", "lost_card", "exchange_rate"]
SCHEMA = {"type": "object", "required": ["intent", "answer"], "properties": {"intent": {"type": "string"}, "answer": {"type": "string"}}}
TOML = """
[eval]
test_set = "test_set.jsonl"
max_new_tokens = 12
batch_size = 8

[policies]
output_schema = {type = "object", required = ["intent", "answer"]}
"""


# --- metrics -------------------------------------------------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_metrics_on_hand_built_outcomes() -> None:
    f = lambda t, s: Finding(problem_type=t, severity=s, check="test")  # noqa: E731
    outcomes = [
        ItemOutcome(id="1", intent="a"),
        ItemOutcome(id="2", intent="a", findings=[f("format_error", "low"), f("format_error", "low")]),
        ItemOutcome(id="3", intent="a", findings=[f("over_promise", "high"), f("format_error", "low")]),
        ItemOutcome(id="4", intent="b"),
        ItemOutcome(id="5", intent=None, findings=[f("made_up_type", "critical")]),
        ItemOutcome(id="6", intent="b", error="no answer generated"),
    ]
    m = compute_metrics("test", outcomes, ["format_error", "over_promise", "wrong_intent"])
    assert m.size == 6
    assert (m.task_success.count, m.task_success.n) == (2, 6)
    assert m.task_success.rate == pytest.approx(1 / 3)
    assert (m.task_success.low, m.task_success.high) == pytest.approx(wilson_interval(2, 6))
    assert {k: (r.count, r.n) for k, r in m.per_intent.items()} == {"(none)": (0, 1), "a": (1, 3), "b": (1, 2)}
    # an item counts once per type however many findings of that type it has
    assert {k: r.count for k, r in m.problem_rates.items()} == {"format_error": 2, "over_promise": 1, "wrong_intent": 0, "made_up_type": 1}
    assert m.problem_rates["format_error"].rate == pytest.approx(2 / 6)
    assert m.severity_counts == {"low": 3, "medium": 0, "high": 1, "critical": 1}
    assert m.type_severities == {"format_error": {"low": 2}, "over_promise": {"high": 1}, "made_up_type": {"critical": 1}}
    assert m.generation_errors == 1
    empty = compute_metrics("baseline", [], ["format_error"])
    assert empty.empty and empty.task_success.rate == 0.0 and empty.problem_rates["format_error"].n == 0


# --- the fixed test set --------------------------------------------------------------------------------------


def row(i: int, intent: str) -> dict[str, Any]:
    return {
        "id": f"t{i}",
        "messages": [
            {"role": "system", "content": "Answer as JSON."},
            {"role": "user", "content": f"question {i} about {intent.replace('_', ' ')}"},
        ],
        "reference": {"intent": intent, "answer": json.dumps({"intent": intent, "answer": "ok"})},
    }


def write_test_set(path: Path, n: int = 20) -> list[dict[str, Any]]:
    rows = [row(i, INTENTS[i % len(INTENTS)]) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def test_load_test_set(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    rows = write_test_set(path, 6)
    del rows[2]["id"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")  # a blank line is fine
    items = load_test_set(path)
    assert [i.id for i in items] == ["t0", "t1", "test.jsonl:3", "t3", "t4", "t5"]
    assert items[1].intent == "refund_status" and items[1].reference.source == "test_set"
    assert items[0].messages[1].content == "question 0 about card arrival"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"test\.jsonl:2: not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), r"test\.jsonl:2: reference: Field required"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}], "reference": {}}), r"test\.jsonl:2: messages\.0\.role"),
        (json.dumps({"messages": [{"role": "system", "content": "x"}], "reference": {}}), r"test\.jsonl:2: messages hold no user message"),
        (
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "reference": {}}),
            r"test\.jsonl:2: messages end with an assistant turn",
        ),
        (json.dumps({**row(0, "lost_card")}), r"test\.jsonl:2: id 't0' appears twice"),
        (json.dumps({**row(9, "lost_card"), "extra": 1}), r"test\.jsonl:2: extra: Extra inputs"),
    ],
)
def test_bad_test_set_rows_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(row(0, "card_arrival")) + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(UserInputError, match=message):
        load_test_set(path)


def test_missing_test_set_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no such file"):
        load_test_set(tmp_path / "nope.jsonl")


# --- baseline and problem sets from the store ----------------------------------------------------------------


def seed_failures(store: Store) -> None:
    """Four failures: a verified problem, an unverified problem, a graduated core baseline sample (with a
    newer label naming its intent) and a secondary baseline sample without a verified correction."""
    specs = [
        # id, intent, tier, verified correction?, problem type
        ("p1", "refund_status", SampleTier.PROBLEM, True, "over_promise"),
        ("p2", "refund_status", SampleTier.PROBLEM, False, "over_promise"),
        ("b1", "card_arrival", SampleTier.CORE, True, "wrong_intent"),
        ("b2", "lost_card", SampleTier.SECONDARY, False, "format_error"),
        ("c1", "lost_card", SampleTier.CANDIDATE, True, "format_error"),
    ]
    interaction_repo.insert(
        store,
        [
            Interaction(
                id=iid,
                timestamp="2026-01-02T03:04:05Z",
                model_version="v1",
                intent=intent,
                content_hash=f"h-{iid}",
                messages=[
                    Message(role="user", content=f"help with {intent} ({iid})"),
                    Message(role="assistant", content="We guarantee a refund today"),
                ],
            )
            for iid, intent, *_ in specs
        ],
    )
    with store.begin() as conn:
        failure_repo.insert_failures(
            conn,
            [
                Failure(
                    id=failure_repo.failure_id_for(iid),
                    interaction_id=iid,
                    rule="thumbs_down",
                    first_seen_version="v1",
                    intent=intent,
                    status=FailureStatus.JUDGED,
                )
                for iid, intent, *_ in specs
            ],
        )
        for iid, _intent, tier, verified, problem_type in specs:
            fid = failure_repo.failure_id_for(iid)
            failure_repo.save_verdict(
                conn, Verdict(failure_id=fid, is_failure=True, problem_type=problem_type, severity="high", judge="rule")
            )
            failure_repo.save_correction(
                conn,
                Correction(
                    failure_id=fid,
                    answer=f"corrected answer for {iid}",
                    generator="kb",
                    verification=Verification(passed=verified, verifier="rule"),
                ),
            )
            if tier != SampleTier.PROBLEM:
                failure_repo.move_tier(conn, fid, tier, actor="test")
    from flywheel.data.labels import add_label

    add_label(store, failure_repo.failure_id_for("b1"), {"intent": "old_label"}, "alice")
    add_label(store, failure_repo.failure_id_for("b1"), {"intent": "card_delivery"}, "bob")


def test_baseline_and_problem_sets(any_store: Store) -> None:
    seed_failures(any_store)
    problems = problem_set(any_store)
    assert [i.id for i in problems] == [failure_repo.failure_id_for("p1")]
    p1 = problems[0]
    assert p1.messages == [Message(role="user", content="help with refund_status (p1)")]  # the logged answer is not in the prompt
    assert p1.reference == Reference(intent="refund_status", answer="corrected answer for p1", source="correction")
    assert p1.problem_type == "over_promise"
    assert default_targeted({"problem": problems}) == ["over_promise"]
    baseline = {i.id: i for i in baseline_set(any_store)}
    # every baseline tier, each item knowing its tier; b2 has no verified correction
    assert {i: item.tier for i, item in baseline.items()} == {
        failure_repo.failure_id_for("b1"): "core_baseline",
        failure_repo.failure_id_for("c1"): "candidate_baseline",
    }
    b1 = baseline[failure_repo.failure_id_for("b1")]
    assert b1.intent == "card_delivery"  # the newest label beats the failure's own intent
    assert b1.reference.answer == "corrected answer for b1"
    assert problems[0].tier is None


def test_empty_store_gives_empty_sets(store: Store) -> None:
    assert problem_set(store) == [] and baseline_set(store) == []


# --- the runner ----------------------------------------------------------------------------------------------


def schema_settings(project: Path, **overrides: Any) -> Settings:
    return load_settings(project, policies={"output_schema": SCHEMA}, **overrides)


def answer_for(conversation: list[dict[str, Any]], wrong: bool = False) -> str:
    """A scripted model: reads the intent from the question and answers in the required JSON."""
    question = conversation[-1]["content"]
    intent = next(i for i in INTENTS if i.replace("_", " ") in question)
    return json.dumps({"intent": "lost_card" if wrong else intent, "answer": "Here is what I found."})


def test_evaluate_model_with_the_rule_judge(project: Path, tmp_path: Path) -> None:
    settings = schema_settings(project, eval={"batch_size": 3})
    path = tmp_path / "test.jsonl"
    write_test_set(path, 8)
    items = load_test_set(path)
    batches: list[int] = []

    def scripted(conversations: list[list[dict[str, Any]]]) -> list[Any]:
        batches.append(len(conversations))
        out: list[Any] = []
        for conv in conversations:
            number = int(re.search(r"question (\d+)", conv[-1]["content"]).group(1))
            if number == 1:
                out.append("not json at all")  # format_error (low)
            elif number == 5:
                out.append(answer_for(conv, wrong=True))  # t5 is refund_status: answering lost_card is wrong_intent
            elif number == 3:
                out.append(json.dumps({"intent": "exchange_rate", "answer": "We guarantee a refund by Friday."}))  # over_promise
            elif number == 4:
                out.append(Message(role="assistant", content=answer_for(conv)))  # a full message is accepted too
            else:
                out.append(answer_for(conv))
        return out

    m = evaluate_model(scripted, items, RuleJudge(settings), settings, name="test")
    assert batches == [3, 3, 2]  # chunked by eval.batch_size
    failing = {o.id: sorted(f.problem_type for f in o.findings) for o in m.outcomes if not o.success}
    assert failing == {"t1": ["format_error"], "t3": ["over_promise"], "t5": ["wrong_intent"]}
    assert (m.task_success.count, m.task_success.n) == (5, 8)
    assert {t: r.count for t, r in m.problem_rates.items() if r.count} == {"format_error": 1, "over_promise": 1, "wrong_intent": 1}
    assert m.severity_counts == {"low": 1, "medium": 1, "high": 1, "critical": 0}
    assert m.per_intent["exchange_rate"].count == 1 and m.per_intent["exchange_rate"].n == 2
    # compliance hits per policy pattern: t3's promise matched guaranteed_refund; every pattern is listed
    assert m.compliance_hits == {"guaranteed_refund": 1, "fee_waiver_promise": 0}

    wrong = evaluate_model(lambda convs: [answer_for(c, wrong=True) for c in convs], items, RuleJudge(settings), settings)
    assert wrong.problem_rates["wrong_intent"].count == 6  # every item whose intent is not lost_card
    assert all(f.check == "intent" for o in wrong.outcomes for f in o.findings)


def test_a_broken_model_is_an_infrastructure_error(project: Path) -> None:
    settings = schema_settings(project)
    items = [EvalItem(id="x", messages=[Message(role="user", content="hi")], reference=Reference())]

    def broken(_conversations: Any) -> list[str]:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(InfrastructureError, match="generation failed on the test set at item x: CUDA out of memory"):
        evaluate_model(broken, items, RuleJudge(settings), settings)
    with pytest.raises(InfrastructureError, match="returned 0 answers for 1 prompts"):
        evaluate_model(lambda convs: [], items, RuleJudge(settings), settings)
    missing = evaluate_model(lambda convs: [None], items, RuleJudge(settings), settings)
    assert missing.outcomes[0].error == "no answer generated" and missing.task_success.count == 0


def test_llm_judge_adds_what_the_rules_miss(project: Path, tmp_path: Path, openai_server: OpenAIServer) -> None:
    """With an endpoint configured, answers the rules did not settle go to the LLM judge (through the
    real langchain-openai client, against a local server); its failures become `llm` findings."""
    settings = schema_settings(
        project,
        llm={
            "base_url": openai_server.base_url,
            "judge_model": "judge-model",
            "timeout_s": 5.0,
            "max_retries": 1,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.02,
        },
    )
    path = tmp_path / "test.jsonl"
    write_test_set(path, 4)
    items = load_test_set(path)
    vague = {
        "is_failure": True,
        "problem_type": "missing_knowledge",
        "severity": "medium",
        "acceptance": "Risk",
        "rationale": "says nothing the KB knows",
    }
    fine = {"is_failure": False, "problem_type": None, "severity": None, "acceptance": "Accept", "rationale": "ok"}
    openai_server.handler = lambda req: Reply.json(vague if "I am not sure" in req.text else fine)

    def scripted(conversations: list[list[dict[str, Any]]]) -> list[str]:
        out = []
        for conv in conversations:
            number = int(re.search(r"question (\d+)", conv[-1]["content"]).group(1))
            intent = next(i for i in INTENTS if i.replace("_", " ") in conv[-1]["content"])
            if number == 0:
                out.append(json.dumps({"intent": intent, "answer": "ok"}))  # equals the reference: settled by the rules
            elif number == 1:
                out.append(json.dumps({"intent": intent, "answer": "We guarantee a refund."}))  # high rule finding: settled
            else:
                out.append(json.dumps({"intent": intent, "answer": "I am not sure." if number == 2 else "It takes 3 days."}))
        return out

    from flywheel.llm import usage

    calls_before = usage()
    m = evaluate_model(scripted, items, RuleJudge(settings), settings)
    assert len(openai_server.chat_requests) == 2  # t2 and t3 only
    # flywheel.llm counts every call and the tokens the server reported (the eval report's cost block)
    calls_after = usage()
    assert calls_after["calls"] - calls_before["calls"] == 2 and calls_after["tokens"] > calls_before["tokens"]
    assert m.judge == "rule+llm:judge-model" and m.llm_unjudged == 0
    found = {o.id: [(f.problem_type, f.check) for f in o.findings] for o in m.outcomes}
    assert found == {"t0": [], "t1": [("over_promise", "policy:guaranteed_refund")], "t2": [("missing_knowledge", "llm")], "t3": []}

    # verdicts out of schema after the re-asks: the answer stays judged by its rule findings only
    openai_server.handler = lambda req: Reply.json({"verdict": "meh"})
    m = evaluate_model(scripted, items, RuleJudge(settings), settings)
    assert m.llm_unjudged == 2 and m.task_success.count == 3

    # a broken endpoint stops the evaluation: the models must be judged alike
    openai_server.handler = lambda req: Reply.server_error(503)
    with pytest.raises(InfrastructureError, match="the LLM judge at .* failed on 2 of 2 answers in the test set"):
        evaluate_model(scripted, items, RuleJudge(settings), settings)


# --- end to end on a tiny real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Not the session's tiny_model_dir: this one's vocabulary is built from this module's JSON answers and
    # its own intents (vocab_size=400), and the test writes curve.json beside the model folder.
    from flywheel.demo.tiny_model import build_tiny_model

    corpus = [json.dumps({"intent": i, "answer": "Here is what I found."}) for i in INTENTS]
    corpus += [f"question {n} about {i.replace('_', ' ')}" for n in range(20) for i in INTENTS]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", corpus, vocab_size=400, hidden=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA adapter over the tiny model (freshly initialised: B = 0, so it answers as the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


def make_project(project: Path, rows: int = 20) -> None:
    (project / "flywheel.toml").write_text(TOML, encoding="utf-8")
    write_test_set(project / "test_set.jsonl", rows)


def test_run_eval_tiny_model_against_a_scripted_better_model(project: Path, tiny_model: Path) -> None:
    make_project(project)
    ctx = Context(settings=load_settings(project))
    seed_failures(ctx.store)  # a problem set (p1) and a baseline set (b1) next to the 20-row test set
    (tiny_model.parent / "curve.json").write_text(
        json.dumps({"log_history": [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.1, "learning_rate": 1e-4}]})
    )
    calls: dict[str, int] = {}

    def load(ref: ModelRef, settings: Settings):
        calls[ref.name] = calls.get(ref.name, 0) + 1
        if ref.name == "base":
            return local_generate_fn(ref, settings)  # the real tiny model: untrained, never valid JSON

        def better(conversations: list[list[dict[str, Any]]]) -> list[str]:
            return [
                answer_for(c) if "question" in c[-1]["content"] else json.dumps({"intent": "refund_status", "answer": "fixed"})
                for c in conversations
            ]

        return better, lambda: None

    champion = ModelRef(name="base", base_model=str(tiny_model))
    candidate = ModelRef(name="scripted", base_model=str(tiny_model), adapter_path=str(tiny_model / "no-adapter"))
    report = run_eval(ctx, candidate, champion, targeted=["format_error"], load_model=load, curve_path=tiny_model.parent / "curve.json")
    try:
        assert calls == {"base": 1, "scripted": 1}  # each model loaded once for all three sets
        test_before, test_after = report.before["test"], report.after["test"]
        assert test_before.size == test_after.size == 20
        # the untrained tiny model never writes the required JSON; the scripted one always does
        assert test_before.problem_rates["format_error"].rate == 1.0 and test_before.task_success.rate == 0.0
        assert test_after.problem_rates["format_error"].rate == 0.0 and test_after.task_success.rate == 1.0
        assert report.before["problem"].size == 1 and report.before["baseline"].size == 2  # core b1, candidate c1
        # b1's newest label says card_delivery, c1 is lost_card; the scripted answer says refund_status
        assert report.after["baseline"].problem_rates["wrong_intent"].count == 2
        assert report.before["baseline"].problem_rates["format_error"].count == 2
        assert {o.tier for o in report.after["baseline"].outcomes} == {"core_baseline", "candidate_baseline"}
        assert set(report.after["baseline"].per_tier) == {"core_baseline", "candidate_baseline"}
        # the core sample b1 fails with both models: reported, not blamed on the candidate
        core = next(c for c in report.gate.checks if c.kind == "core_baseline")
        assert core.passed and "1 fail with the champion too" in core.reason and failure_repo.failure_id_for("b1") in core.reason
        # ROUGE-L against the reference answer where there is one: {"intent": "refund_status", "answer": "fixed"}
        # against "corrected answer for p1" share one word of four each way
        scores = report.after["problem"].reference_scores
        assert scores is not None and scores.n == 1 and scores.rouge_l == pytest.approx(0.25)
        # BLEU: 1 of 4 words; the 2-, 3- and 4-gram orders with no match smoothed to 1/(2 x 3), 1/(4 x 2), 1/(8 x 1)
        assert scores.bleu == pytest.approx((1 / 4 * 1 / 6 * 1 / 8 * 1 / 8) ** 0.25)
        # the test set's reference answers are {"intent": ..., "answer": "ok"}; the scripted model says
        # {"intent": <the same>, "answer": "Here is what I found."}: 3 common words of 8 and 4, in order
        test_scores = report.after["test"].reference_scores
        assert (
            test_scores is not None and test_scores.n == 20 and test_scores.rouge_l == pytest.approx(2 * (3 / 8 * 3 / 4) / (3 / 8 + 3 / 4))
        )
        # corpus BLEU: 1- to 3-gram precisions 60/160, 40/140, 20/120; no 4-gram matches (smoothed to 1/(2 x 100))
        bleu = math.exp((math.log(60 / 160) + math.log(40 / 140) + math.log(20 / 120) + math.log(1 / 200)) / 4)
        assert test_scores.bleu == pytest.approx(bleu)
        assert report.after["test"].compliance_hits == {"fee_waiver_promise": 0, "guaranteed_refund": 0}
        # format_error falls 100% -> 0% on the test and problem sets; baseline success stays 0/1; wrong_intent
        # is new but at medium severity, which is not blocked
        assert report.gate.passed, report.gate.reasons
        assert report.path_json.is_file() and report.path_html.is_file()
        assert report.report_hash == report_hash_of(report.path_json)
        document = json.loads(report.path_json.read_text())
        digest = hashlib.sha256((project / "test_set.jsonl").read_bytes()).hexdigest()
        assert document["sets"]["test"] == {"size": 20, "source": f"test_set.jsonl (sha256 {digest[:16]})"}
        assert document["training_curve"] == {"loss": [[1.0, 6.0], [2.0, 5.1]]}
        assert document["candidate_metrics"]["test"]["task_success"]["rate"] == 1.0
        # timing, measured around generation: the real tiny model reports its tokens and its first token
        # (a forward hook), the scripted model neither
        real, scripted = document["timing"]["champion"], document["timing"]["candidate"]
        assert real["all"]["items"] == 20 + 1 + 2 and real["test"]["items"] == 20
        assert real["all"]["first_token_s"] > 0 and real["all"]["tokens_per_s"] > 0 and real["all"]["tokens"] > 0
        assert 0 < real["test"]["first_token_s"] < real["test"]["seconds"]
        assert scripted["all"]["items"] == 23 and scripted["all"]["first_token_s"] is None and scripted["all"]["tokens"] is None
        cost = document["cost"]
        assert set(cost) == {"eval_seconds", "train_seconds", "labels", "llm_calls", "llm_tokens"}
        # an unregistered candidate records no training job or dataset; offline, no LLM call
        assert cost["eval_seconds"] > 0 and cost["train_seconds"] is None and cost["labels"] is None
        assert (cost["llm_calls"], cost["llm_tokens"]) == (0, 0)
        html = report.path_html.read_text()
        assert "<h2>Speed</h2>" in html and "<h2>Cost</h2>" in html and "<h2>Rarest intents</h2>" in html
        assert "ROUGE-L vs reference answers" in html and "compliance hits: policy guaranteed_refund" in html
        # the same models on the same data give the same report: an approval given for it stays valid,
        # although the second run's timing and cost differ
        again = run_eval(ctx, candidate, champion, targeted=["format_error"], load_model=load, curve_path=tiny_model.parent / "curve.json")
        assert again.report_hash == report.report_hash and again.path_json == report.path_json
        assert report_hash_of(again.path_json) == report.report_hash
    finally:
        ctx.close()


def test_flywheel_eval_registered_versions(
    project: Path, tiny_model: Path, tiny_adapter: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel.release import registry

    make_project(project, rows=12)
    monkeypatch.setenv("COLUMNS", "200")
    ctx = Context(settings=load_settings(project))
    try:
        base = registry.register_base(ctx.store, str(tiny_model))
        cand = registry.register_version(ctx.store, base_model=str(tiny_model), adapter_path=tiny_adapter)
        assert (base.id, cand.id) == ("v1", "v2")
    finally:
        ctx.close()

    # the zero-initialised adapter answers exactly as the champion: format_error cannot fall
    capsys.readouterr()
    code = main(["-C", str(project), "eval", "--candidate", "v2", "--targeted", "format_error"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "gate FAILED" in out and "misses the required 30%" in out
    assert "v2 (candidate) vs v1 (champion)" in out and "report " in out

    code = main(["-C", str(project), "eval", "--candidate", "v2", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0  # nothing targeted (no problem set), nothing regressed
    assert printed["attached_to"] == "v2"
    assert printed["report"]["gate"]["passed"] is True
    assert printed["report"]["candidate"]["adapter_sha256"] == cand.adapter_sha256
    assert printed["report_hash"] == report_hash_of(printed["path_json"])
    # the first-token hook sits under the PEFT wrapper too: both the base and the adapter model are timed
    for role in ("champion", "candidate"):
        timing = printed["report"]["timing"][role]["test"]
        assert timing["items"] == 12 and 0 < timing["first_token_s"] < timing["seconds"] and timing["tokens_per_s"] > 0
    ctx = Context(settings=load_settings(project))
    try:
        stored = registry.resolve(ctx.store, "v2")
        assert stored.eval_report_hash == printed["report_hash"] and stored.gate_passed is True
        assert stored.metrics["task_success"] == 0.0 and stored.metrics["primary_set"] == "test"
    finally:
        ctx.close()

    assert main(["-C", str(project), "eval", "--candidate", "v9"]) == 3  # NotFoundError
    assert main(["-C", str(project), "eval", "--candidate", "v2", "--targeted", "nonsense"]) == 2
    assert "not in the taxonomy" in capsys.readouterr().err


def test_flywheel_eval_unregistered_adapter(
    project: Path, tiny_model: Path, tiny_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flywheel.commands.evaluate import resolve_candidate, resolve_champion

    make_project(project, rows=6)
    ctx = Context(settings=load_settings(project))
    try:
        ref = resolve_candidate(ctx, None, tiny_adapter, tiny_model)
        assert (ref.name, ref.base_model, ref.adapter_path, ref.version) == ("adapter", str(tiny_model), str(tiny_adapter), None)
        assert resolve_candidate(ctx, str(tiny_model), None, None).adapter_path is None  # a whole model folder
        # no champion registered: the candidate's own base model is the one to beat
        assert resolve_champion(ctx, None, ref) == ModelRef(name="base", base_model=str(tiny_model))
        with pytest.raises(UserInputError, match="is an adapter folder: give --base"):
            resolve_candidate(ctx, None, tiny_adapter, None)
        with pytest.raises(UserInputError, match="neither a PEFT adapter folder nor a model folder"):
            resolve_candidate(ctx, str(project), None, None)
        with pytest.raises(UserInputError, match="not both"):
            resolve_candidate(ctx, "v1", tiny_adapter, tiny_model)
    finally:
        ctx.close()

    capsys.readouterr()
    code = main(["-C", str(project), "eval", "--candidate-adapter", str(tiny_adapter), "--base", str(tiny_model), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["attached_to"] is None
    assert printed["report"]["champion"]["name"] == "base" and printed["report"]["sets"]["test"]["size"] == 6
    assert Path(printed["path_html"]).is_file()
