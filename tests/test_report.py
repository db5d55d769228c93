"""The eval report: report.json holds the metrics exactly, its sha256 is the report hash, the HTML has
its SVG charts and escapes every logged string."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from test_gate import GATE, TYPES, build, candidate, champion

from flywheel.errors import UserInputError
from flywheel.evals.charts import nice_ticks
from flywheel.evals.gate import evaluate_gate
from flywheel.evals.metrics import ItemOutcome, compute_metrics
from flywheel.evals.report import ModelRef, find_curve, load_curve, report_hash_of, write_report
from flywheel.records import Finding
from flywheel.settings import Settings
from flywheel.store.db import Store

EVIL = "<script>alert('owned')</script>"
CANDIDATE = ModelRef(name="v7", base_model="/models/base", adapter_path="/adapters/v7", adapter_sha256="ab" * 32, version="v7")
CHAMPION = ModelRef(name="v6", base_model="/models/base", version="v6")


def with_evil_intent() -> tuple[dict, dict]:
    """Champion and candidate metrics where one intent name and one answer carry markup from a log."""
    before, after = champion(), candidate()
    evil_before = [
        ItemOutcome(id=f"e{i}", intent=EVIL, findings=[Finding(problem_type="format_error", severity="low", check="x")]) for i in range(5)
    ]
    evil_after = [ItemOutcome(id=f"e{i}", intent=EVIL, answer='<img src=x onerror="alert(1)">') for i in range(5)]
    before["test"] = compute_metrics("test", [*before["test"].outcomes, *evil_before], TYPES)
    after["test"] = compute_metrics("test", [*after["test"].outcomes, *evil_after], TYPES)
    return before, after


def curve_file(tmp_path: Path) -> Path:
    path = tmp_path / "curve.json"
    history = [{"step": s, "loss": 4.0 / (1 + s / 10), "learning_rate": 2e-4, "epoch": s / 50} for s in range(0, 101, 10)]
    history += [{"step": s, "eval_loss": 4.2 / (1 + s / 12)} for s in (25, 50, 75, 100)]
    path.write_text(json.dumps({"log_history": history}))
    return path


def test_report_files_numbers_and_hash(settings: Settings, tmp_path: Path) -> None:
    before, after = with_evil_intent()
    gate = evaluate_gate(before, after, ["over_promise"], settings.gate)
    report = write_report(
        settings, CANDIDATE, CHAMPION, before, after, gate, curve=load_curve(curve_file(tmp_path)), set_sources={"test": "tests.jsonl"}
    )

    payload = report.path_json.read_bytes()
    assert report.report_hash == hashlib.sha256(payload).hexdigest() == report_hash_of(report.path_json)
    assert report.path_json.parent == settings.artifacts_path / "reports" / f"v7-{report.report_hash[:12]}"
    assert report.path_html.parent == report.path_json.parent

    document = json.loads(payload)
    assert document["candidate"] == CANDIDATE.model_dump(mode="json") and document["champion"]["name"] == "v6"
    assert document["targeted"] == ["over_promise"]
    assert document["sets"] == {
        "test": {"size": 105, "source": "tests.jsonl"},
        "baseline": {"size": 50, "source": ""},
        "problem": {"size": 10, "source": ""},
    }
    for side, metrics in (("champion_metrics", before), ("candidate_metrics", after)):
        for name, m in metrics.items():
            stored = document[side][name]
            assert stored["size"] == m.size
            assert stored["task_success"] == m.task_success.model_dump()
            assert {t: r["rate"] for t, r in stored["problem_rates"].items()} == {t: r.rate for t, r in m.problem_rates.items()}
            assert stored["per_intent"][EVIL if name == "test" else next(iter(m.per_intent))]["n"] >= 1
            assert stored["severity_counts"] == m.severity_counts
    assert document["gate"]["passed"] is gate.passed and document["gate"]["reasons"] == gate.reasons
    assert document["settings"]["gate"] == settings.gate.model_dump(mode="json")
    assert document["settings"]["judge"] == "rule"
    assert set(document["training_curve"]) == {"loss", "eval_loss"}  # learning rate and epoch are not curves
    assert document["training_curve"]["eval_loss"][0] == [25.0, pytest.approx(4.2 / (1 + 25 / 12))]

    html = report.path_html.read_text()
    assert html.count("<svg") == 5  # problem rates on the 3 sets, per-intent changes, the training curve
    assert html.count("<polyline") == 2  # two curve series
    assert "Success change per intent" in html and "Loss by training step" in html
    assert "Problem rate per type, fixed test set" in html and "Gate PASSED" in html
    assert report.report_hash in html
    # every logged string is escaped: the page holds no script, no handler, no external resource
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert not re.search(r"""\b(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "default-src 'none'" in html  # and a browser would refuse to load anything anyway
    for reason in gate.reasons[:3]:
        assert reason.replace("<", "&lt;") in html.replace("&gt;", ">")


def test_same_results_same_hash_and_folder(settings: Settings) -> None:
    before, after = champion(), candidate()
    gate = evaluate_gate(before, after, ["over_promise"], settings.gate)
    first = write_report(settings, CANDIDATE, CHAMPION, before, after, gate)
    second = write_report(settings, CANDIDATE, CHAMPION, before, after, gate)
    assert first.report_hash == second.report_hash and first.path_json == second.path_json
    # one changed answer is another report
    worse = candidate(baseline=[(49, "cards", []), (1, "cards", ["format_error"])])
    third = write_report(settings, CANDIDATE, CHAMPION, before, worse, evaluate_gate(before, worse, ["over_promise"], settings.gate))
    assert third.report_hash != first.report_hash and third.path_json.parent != first.path_json.parent


def test_failed_gate_and_empty_sets_render(settings: Settings) -> None:
    empty = {name: build(name, []) for name in ("test", "baseline", "problem")}
    before = {**empty, "problem": build("problem", [(8, "billing", ["over_promise"]), (2, "billing", [])])}
    after = {**empty, "problem": build("problem", [(7, "billing", ["over_promise"]), (3, "billing", [])])}
    gate = evaluate_gate(before, after, ["over_promise"], GATE)
    assert not gate.passed
    report = write_report(settings, ModelRef(name="../../etc/x y", base_model="/b"), CHAMPION, before, after, gate)
    assert report.path_json.parent.parent == settings.artifacts_path / "reports"  # a hostile name stays inside
    html = report.path_html.read_text()
    assert "Gate FAILED" in html and "Failing checks" in html
    assert html.count(">empty<") == 2  # the two empty sets' cards
    assert "no training curve was recorded" in html
    assert "misses the required 30%" in html
    metrics = report.key_metrics()
    assert metrics["primary_set"] == "problem" and metrics["task_success"] == pytest.approx(0.3)
    assert metrics["targeted_problem_rates"] == {"over_promise": pytest.approx(0.7)}
    assert metrics["gate_passed"] is False and set(metrics["sets"]) == {"problem"}


def test_load_curve_formats_and_errors(tmp_path: Path) -> None:
    series = tmp_path / "series.json"
    series.write_text(json.dumps({"loss": [[2, 1.5], [1, 2.0]], "eval_loss": [[2, 1.8]]}))
    assert load_curve(series) == {"loss": [(1.0, 2.0), (2.0, 1.5)], "eval_loss": [(2.0, 1.8)]}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"step": 3, "train_loss": 0.5}, {"no_step": 1, "loss": 9}]))
    assert load_curve(plain) == {"train_loss": [(3.0, 0.5)]}
    for name, content, message in [
        ("broken.json", "{", "training curve .*broken.json"),
        ("nothing.json", json.dumps([{"step": 1, "accuracy": 0.5}]), "no loss values with a step"),
        ("words.json", json.dumps({"loss": [["a", "b"]]}), "series 'loss' holds non-numbers"),
    ]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(UserInputError, match=message):
            load_curve(path)
    with pytest.raises(UserInputError):
        load_curve(tmp_path / "missing.json")


def test_find_curve_beside_the_adapter(tmp_path: Path) -> None:
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    ref = ModelRef(name="v2", base_model="/b", adapter_path=str(adapter))
    assert find_curve(ref) is None and find_curve(ModelRef(name="b", base_model="/b")) is None
    (tmp_path / "run" / "curve.json").write_text("[]")
    assert find_curve(ref) == tmp_path / "run" / "curve.json"
    (adapter / "curve.json").write_text("[]")
    assert find_curve(ref) == adapter / "curve.json"


def test_nice_ticks_cover_the_range() -> None:
    assert nice_ticks(0.0, 0.23, 5) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert nice_ticks(0.0, 1.0, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(1.3, 6.0, 5)
    assert ticks[0] <= 1.3 and ticks[-1] >= 6.0


def test_flywheel_training_curve_files_load_with_one_series_per_split(tmp_path: Path) -> None:
    # the layout flywheel.trainer.recipes writes next to an adapter
    path = tmp_path / "curve.json"
    path.write_text(
        json.dumps(
            {
                "train": [{"step": 1, "epoch": 0.1, "loss": 2.0}, {"step": 5, "epoch": 0.5, "loss": 1.0}],
                "eval": [{"step": 5, "epoch": 0.5, "loss": 1.5}],
            }
        ),
        encoding="utf-8",
    )
    curve = load_curve(path)
    assert curve == {"train_loss": [(1.0, 2.0), (5.0, 1.0)], "eval_loss": [(5.0, 1.5)]}


def test_every_logged_or_named_string_is_escaped_and_never_rendered_as_a_template(settings: Settings) -> None:
    before, after = champion(), candidate()
    hostile_detail = '"><script>alert(2)</script>'
    before["test"] = compute_metrics("test", [*before["test"].outcomes, ItemOutcome(id="h1", intent="cards")], TYPES)
    after["test"] = compute_metrics(
        "test",
        [
            *after["test"].outcomes,
            ItemOutcome(
                id="h1",
                intent="cards",
                answer='{{ "pwn" ~ "ed" }}',
                findings=[Finding(problem_type="format_error", severity="low", check="schema", detail=hostile_detail)],
            ),
        ],
        TYPES,
    )
    gate = evaluate_gate(before, after, ["over_promise"], settings.gate)
    name = ModelRef(name=EVIL, base_model="{% raw %}<b>", adapter_path="/a/{{ x }}")
    report = write_report(
        settings, name, CHAMPION, before, after, gate, set_sources={"test": EVIL}, notes=[EVIL, '{{ "pwn" ~ "ed" }}', "{# gone? #}"]
    )
    html = report.path_html.read_text()
    assert "<script" not in html.lower() and "<b>" not in html
    assert html.count("&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;") >= 4  # title, header, set source, note
    assert 'title="schema: &quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;"' in html  # cannot leave the attribute
    assert html.count("{{ &quot;pwn&quot; ~ &quot;ed&quot; }}") == 2 and "pwned" not in html  # the answer and the note, as text
    assert "{# gone? #}" in html and "{% raw %}&lt;b&gt;" in html and "/a/{{ x }}" in html


# --- answer quality, cost and timing --------------------------------------------------------------------------


def test_rouge_l_and_bleu_on_known_strings() -> None:
    from flywheel.evals.text_metrics import corpus_bleu, lcs_length, reference_scores, rouge_l, tokens

    # LCS "the cat on the mat": 5 of 6 words each way
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # words only, lower-cased: JSON punctuation and case do not count, the key "answer" does
    assert tokens('{"answer": "Card ARRIVES in 3 days!"}') == ["answer", "card", "arrives", "in", "3", "days"]
    assert rouge_l('{"answer": "Card arrives in 3 days"}', "card arrives in 3 days!") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert rouge_l("", "anything") == 0.0 and rouge_l("a b", "c d") == 0.0 and lcs_length("abcbdab", "bdcaba") == 4
    # BLEU-4 by hand: clipped precisions 5/6, 3/5, 1/4 and no 4-gram (smoothed to 1/(2 x 3)); the same
    # number sacrebleu 2.6's corpus_bleu gives for these strings (37.99)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # brevity: a 4-word answer to a 6-word reference, every n-gram right, pays exp(1 - 6/4)
    assert corpus_bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(1 - 6 / 4))
    assert corpus_bleu(["a b c"], ["a b c"]) == 0.0  # no 4-gram anywhere: BLEU-4 is 0
    assert corpus_bleu(["x y z w"], ["a b c d"]) == 0.0  # nothing in common
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])
    scores = reference_scores([("the cat sat on the mat", "the cat is on the mat"), ("", "no answer at all")])
    assert scores is not None and scores.n == 2 and scores.rouge_l == pytest.approx(5 / 12)
    assert reference_scores([]) is None


def test_rarest_intents_are_the_ones_with_fewest_items() -> None:
    from flywheel.evals.report import rarest_intents

    outcomes = [ItemOutcome(id=f"{intent}-{i}", intent=intent) for intent, n in (("a", 5), ("b", 2), ("c", 9), ("d", 2)) for i in range(n)]
    outcomes.append(ItemOutcome(id="none", intent=None))
    metrics = compute_metrics("test", outcomes, TYPES)
    assert rarest_intents(metrics, 3) == ["b", "d", "a"] and rarest_intents(None) == []


def test_cost_block_timing_and_a_hash_that_leaves_them_out(settings: Settings, store: Store, tmp_path: Path) -> None:
    from datetime import timedelta

    from test_eval import seed_failures

    from flywheel.data.labels import add_label
    from flywheel.evals.cost import COST_KEYS, Cost, training_cost
    from flywheel.evals.timing import GenerationTiming
    from flywheel.records import utcnow
    from flywheel.release.records import ModelVersion
    from flywheel.store import datasets as dataset_repo
    from flywheel.store import versions as version_store
    from flywheel.store.failures import failure_id_for
    from flywheel.trainer.jobs import JobRecord, insert_job

    # the candidate v2 trained on a dataset of three failures (b1 labelled twice, p1 once, p2 never) in job-1
    seed_failures(store)
    ids = [failure_id_for(x) for x in ("p1", "p2", "b1")]
    add_label(store, ids[0], {"intent": "refund_status"}, "carol")
    dataset_repo.insert_if_new(
        store,
        {
            "id": "ds-1",
            "kind": "sft",
            "path": str(tmp_path),
            "content_hash": "0" * 64,
            "manifest": {"failure_ids": ids},
            "created_at": utcnow(),
        },
    )
    started = utcnow()
    job = JobRecord(
        id="job-1", kind="train_sft", status="succeeded", spec={}, work_dir=str(tmp_path), log_path=str(tmp_path / "log"),
        created_at=started, started_at=started, finished_at=started + timedelta(seconds=90.5),
    )  # fmt: skip
    assert insert_job(store, job)
    with store.begin() as conn:
        version_store.insert_version(conn, ModelVersion(id="v2", base_model="/b", dataset_id="ds-1", job_id="job-1", created_at=utcnow()))
        version_store.insert_version(conn, ModelVersion(id="v3", base_model="/b", created_at=utcnow()))
    assert training_cost(store, "v2") == (90.5, 2)  # a relabelled failure counts once
    # a manifest that counted its labels itself (flywheel.trainer.dataset's `labels` block) is taken at its word
    counted = {"labels": {"labelled": 295, "used": 258, "confirmed_fine": 5, "fine_used": 5}}
    dataset_repo.insert_if_new(
        store, {"id": "ds-2", "kind": "sft", "path": str(tmp_path), "content_hash": "1" * 64, "manifest": counted, "created_at": utcnow()}
    )
    with store.begin() as conn:
        version_store.insert_version(conn, ModelVersion(id="v4", base_model="/b", dataset_id="ds-2", created_at=utcnow()))
    assert training_cost(store, "v4") == (None, 263)
    assert training_cost(store, "v3") == (None, None) and training_cost(store, None) == (None, None)
    assert training_cost(store, "v9") == (None, None)

    before, after = champion(), candidate()
    gate = evaluate_gate(before, after, ["over_promise"], settings.gate)
    cost = Cost(eval_seconds=12.5, train_seconds=90.5, labels=2, llm_calls=3, llm_tokens=400)
    fast = GenerationTiming(items=165, seconds=2.0, tokens=1650, tokens_per_s=825.0, first_token_s=0.04)
    slow = GenerationTiming(items=165, seconds=4.0, tokens=1650, tokens_per_s=412.5, first_token_s=0.08)
    timing = {"champion": {"all": fast, "test": fast}, "candidate": {"all": slow, "test": slow}}
    report = write_report(settings, CANDIDATE, CHAMPION, before, after, gate, cost=cost, timing=timing)
    document = json.loads(report.path_json.read_text())
    assert tuple(document["cost"]) == tuple(sorted(COST_KEYS))
    assert document["cost"] == {"eval_seconds": 12.5, "train_seconds": 90.5, "labels": 2, "llm_calls": 3, "llm_tokens": 400}
    assert document["timing"]["candidate"]["test"]["first_token_s"] == 0.08
    assert report.cost == cost and report.timing is not None
    html = report.path_html.read_text()
    assert "<h2>Cost</h2>" in html and "12.5 s" in html and "90.5 s" in html and "3 (400 tokens)" in html
    assert "<h2>Speed</h2>" in html and "40 ms" in html and "80 ms" in html and "412.5" in html

    # cost and timing describe the run, not the candidate: another run's numbers, or none, keep the hash
    plain = write_report(settings, CANDIDATE, CHAMPION, before, after, gate)
    assert plain.report_hash == report.report_hash and plain.path_json == report.path_json
    rerun = write_report(
        settings, CANDIDATE, CHAMPION, before, after, gate, cost=cost.model_copy(update={"eval_seconds": 99.0}), timing=timing
    )
    assert rerun.report_hash == report.report_hash == report_hash_of(rerun.path_json)
    # editing a measured number leaves the hash; editing a result does not
    document = json.loads(rerun.path_json.read_text())
    document["cost"]["labels"] = 0
    rerun.path_json.write_text(json.dumps(document))
    assert report_hash_of(rerun.path_json) == report.report_hash
    document["candidate_metrics"]["test"]["task_success"]["rate"] = 1.0
    rerun.path_json.write_text(json.dumps(document))
    assert report_hash_of(rerun.path_json) != report.report_hash
