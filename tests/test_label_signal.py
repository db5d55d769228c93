"""Every human answer becomes training signal, with no knowledge base: labels are judged by what they
say, turned into targets from the best verified reply for the labelled intent, counted per source in
the snapshot, and a snapshot that wastes labels is refused. Real SQLite, real Chroma (empty: no KB),
the real CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.context import Context
from flywheel.correct.stage import correct_failures
from flywheel.data.labels import add_label
from flywheel.errors import UserInputError
from flywheel.evals.judge import judge_failures
from flywheel.records import Failure, FailureStatus, Interaction, Message, Signals
from flywheel.store import failures as repo
from flywheel.store import interactions as interaction_repo
from flywheel.trainer.dataset import build_snapshot, read_rows

INTENTS = ["card_arrival", "lost_card", "refund_status"]
REPLIES = {
    "card_arrival": "Cards arrive within a week; track it in the app.",
    "lost_card": "Freeze the card in the app, then order a new one.",
    "refund_status": "Refunds reach your card within 5 business days.",
}


def answer(intent: str) -> str:
    return json.dumps({"intent": intent, "reply": REPLIES[intent]})


@pytest.fixture
def schema_ctx(project: Path) -> Iterator[Context]:
    from flywheel.settings import load_settings

    enum = ", ".join(json.dumps(i) for i in INTENTS)
    toml = (
        "[policies]\n"
        f'output_schema = {{type = "object", properties = {{intent = {{type = "string", enum = [{enum}]}}, reply = {{type = "string", minLength = 1}}}}, '
        'required = ["intent", "reply"], additionalProperties = false}\n'
        # dataset settings that keep every row of a tiny store (no intent floor, no held-out split)
        "[dataset]\nintent_min_samples = 0\nintent_max_ratio = 1.0\nheldout_ratio = 0.0\nreplay_max_share = 1.0\nreplay_min_share = 0.0\n"
    )
    (project / "flywheel.toml").write_text(toml, encoding="utf-8")
    ctx = Context(settings=load_settings(project))
    yield ctx
    ctx.close()


def log(ctx: Context, iid: str, user: str, said: str, *, down: bool) -> str:
    """One logged interaction; with `down`, also a captured, triaged failure. Returns the failure id."""
    item = Interaction(
        id=iid,
        timestamp="2026-01-01T00:00:00Z",
        model_version="v1",
        intent=json.loads(said)["intent"],
        messages=[Message(role="user", content=user), Message(role="assistant", content=said)],
        signals=Signals(feedback="down" if down else None),
        content_hash=f"h-{iid}",
    )
    interaction_repo.insert(ctx.store, [item])
    fid = repo.failure_id_for(iid)
    if down:
        with ctx.store.begin() as conn:
            repo.insert_failures(
                conn,
                [
                    Failure(
                        id=fid,
                        interaction_id=iid,
                        rule="thumbs_down",
                        rules=["thumbs_down"],
                        first_seen_version="v1",
                        intent=item.intent,
                        status=FailureStatus.TRIAGED,
                    )
                ],
            )
    return fid


def stable_traffic(ctx: Context, intent: str, n: int) -> None:
    for k in range(n):
        log(ctx, f"ok-{intent}-{k}", f"question {k} about {intent}", answer(intent), down=False)


def test_a_label_without_kb_becomes_a_verified_target_from_stable_production_replies(schema_ctx: Context) -> None:
    ctx = schema_ctx
    stable_traffic(ctx, "lost_card", 4)  # production answers lost_card well, nobody complains
    wrong = log(ctx, "w1", "someone stole my card", answer("card_arrival"), down=True)  # misrouted
    unlabelled = log(ctx, "w2", "where is my card", answer("card_arrival"), down=True)

    summary = judge_failures(ctx)
    assert summary.unjudged == 2  # a thumbs-down alone proves nothing offline

    add_label(ctx.store, wrong, {"intent": "lost_card"}, "ann", settings=ctx.settings)
    summary = judge_failures(ctx)  # the label given after the first pass settles it now
    assert summary.total == 1 and summary.by_problem_type == {"wrong_intent": 1}
    view = repo.show(ctx.store, wrong)
    assert view.verdict is not None and view.verdict.problem_type == "wrong_intent" and "label:ann" in view.verdict.rationale
    assert repo.show(ctx.store, unlabelled).failure.status == FailureStatus.UNJUDGED

    corrected = correct_failures(ctx)
    assert corrected.verified == 1, corrected.outcomes
    view = repo.show(ctx.store, wrong)
    assert view.failure.status == FailureStatus.VERIFIED and view.correction is not None
    assert view.correction.generator == "reply:production"
    assert json.loads(view.correction.answer) == {"intent": "lost_card", "reply": REPLIES["lost_card"]}
    assert view.correction.context_ids and all(c.startswith("interaction/ok-lost_card-") for c in view.correction.context_ids)

    snapshot = build_snapshot(ctx, "sft")
    by_source = snapshot.manifest["by_source"]
    assert by_source["label"] == {"offered": 1, "train": 1, "heldout": 0, "dropped": {}}
    assert by_source["production_replay"]["offered"] == 4
    assert snapshot.manifest["labels"]["labelled"] == 1 and snapshot.manifest["labels"]["used"] == 1
    rows = [r for r in read_rows(snapshot) if r["origin"] == "label"]
    assert rows[0]["messages"][-1]["content"] == view.correction.answer and rows[0]["intent"] == "lost_card"


def test_a_person_written_answer_beats_the_production_reply_for_later_labels(schema_ctx: Context) -> None:
    ctx = schema_ctx
    stable_traffic(ctx, "refund_status", 3)
    first = log(ctx, "a1", "my refund?", answer("lost_card"), down=True)
    second = log(ctx, "a2", "refund not here", answer("card_arrival"), down=True)
    written = json.dumps({"intent": "refund_status", "reply": "Your refund is on its way; allow 5 business days."})
    add_label(ctx.store, first, {"intent": "refund_status", "answer": written}, "ann", settings=ctx.settings)
    judge_failures(ctx)
    correct_failures(ctx, [first])
    add_label(ctx.store, second, {"intent": "refund_status"}, "bob", settings=ctx.settings)
    judge_failures(ctx)
    correct_failures(ctx, [second])
    view = repo.show(ctx.store, second)
    assert view.correction is not None and view.correction.generator == "reply:label"
    assert view.correction.answer == written and view.correction.context_ids == [f"correction/{first}"]


def test_a_fine_label_is_not_a_failure_and_becomes_a_positive_sample(schema_ctx: Context) -> None:
    ctx = schema_ctx
    stable_traffic(ctx, "card_arrival", 3)
    fine = log(ctx, "f1", "when does my card come", answer("card_arrival"), down=True)
    fixed = log(ctx, "f2", "card stolen", answer("card_arrival"), down=True)
    add_label(ctx.store, fine, {"fine": True}, "ann", settings=ctx.settings)
    add_label(ctx.store, fixed, {"intent": "lost_card"}, "ann", settings=ctx.settings)
    stable_traffic(ctx, "lost_card", 3)
    judge_failures(ctx)
    view = repo.show(ctx.store, fine)
    assert view.failure.status == FailureStatus.NOT_FAILURE and view.verdict is not None
    assert "a person said the answer was fine" in view.verdict.rationale
    correct_failures(ctx)
    snapshot = build_snapshot(ctx, "sft")
    positives = [r for r in read_rows(snapshot) if r["origin"] == "label_fine"]
    assert len(positives) == 1 and positives[0]["failure_id"] == fine and positives[0]["tier"] == "candidate_baseline"
    assert positives[0]["messages"][-1]["content"] == answer("card_arrival")
    assert snapshot.manifest["labels"]["confirmed_fine"] == 1 and snapshot.manifest["labels"]["fine_used"] == 1


def test_many_labels_that_give_no_rows_are_an_error_that_says_why(schema_ctx: Context) -> None:
    ctx = schema_ctx
    stable_traffic(ctx, "card_arrival", 3)  # lost_card: no stable reply, no KB, no written answer
    ok = log(ctx, "ok1", "card stuck in post", answer("lost_card"), down=True)
    add_label(ctx.store, ok, {"intent": "card_arrival"}, "ann", settings=ctx.settings)
    wasted = []
    for k in range(ctx.settings.dataset.label_yield_min_labels):
        wasted.append(log(ctx, f"x{k}", f"phone and card stolen {k}", answer("card_arrival"), down=True))
        add_label(ctx.store, wasted[-1], {"intent": "lost_card"}, "ann", settings=ctx.settings)
    judge_failures(ctx)
    summary = correct_failures(ctx)
    assert summary.verified == 1 and summary.uncorrectable == len(wasted)
    assert "no stable production answer" in repo.show(ctx.store, wasted[0]).correction.verification.reasons[0]
    with pytest.raises(UserInputError) as caught:
        build_snapshot(ctx, "sft")
    message = str(caught.value)
    assert f"only 1 of the {len(wasted) + 1} failures people labelled became training rows" in message
    assert f"{len(wasted)} uncorrectable: no approved response for intent" in message


def test_flywheel_label_file_keeps_good_lines_and_names_each_bad_one(
    schema_ctx: Context, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = schema_ctx
    a = log(ctx, "l1", "card?", answer("card_arrival"), down=True)
    b = log(ctx, "l2", "refund?", answer("card_arrival"), down=True)
    lines = [
        json.dumps({"failure_id": a, "intent": "lost_card", "text": "card?", "logged_answer": "..."}),  # good, queue keys ignored
        json.dumps({"failure_id": b, "intent": "refund_stauts"}),  # unknown intent
        '{"failure_id": "' + b + '", "intent": ',  # broken JSON
        json.dumps({"failure_id": "f-nope", "intent": "lost_card"}),  # no such failure
        json.dumps({"failure_id": b, "fine": True}),  # good
    ]
    path = project / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    code = main(["-C", str(project), "label", "--file", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "labels.jsonl:2: unknown intent 'refund_stauts'; did you mean 'refund_status'?" in err
    assert "labels.jsonl:3: not valid JSON" in err
    assert "labels.jsonl:4: no failure with id 'f-nope'" in err
    assert "3 line(s) of" in err and "the other 2 are stored" in err
    with ctx.store.engine.connect() as conn:
        from flywheel.data.labels import latest_labels

        stored = latest_labels(conn, [a, b])
    assert stored[a].intent == "lost_card" and stored[b].fine

    code = main(["-C", str(project), "label", a, "--intent", "no_such_intent"])
    assert code == 2 and "unknown intent 'no_such_intent'" in capsys.readouterr().err
    code = main(["-C", str(project), "label", "f-missing", "--intent", "lost_card"])
    assert code != 0 and "no failure with id 'f-missing'" in capsys.readouterr().err
