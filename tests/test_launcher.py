"""Training jobs: one process per spec, progress in the store, a SIGKILLed worker resumed to success,
failures reported with the log's tail, and the `train` / `jobs` commands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.context import Context
from flywheel.demo.tiny_model import build_tiny_model, tiny_corpus
from flywheel.errors import JobFailed, NotFoundError
from flywheel.inference.folders import ADAPTER_WEIGHTS
from flywheel.records import utcnow
from flywheel.settings import load_settings
from flywheel.settings_sections import TrainSettings
from flywheel.store.db import Store
from flywheel.trainer import launcher
from flywheel.trainer.jobs import JobRecord, JobStatus, find_job, get_job, insert_job, list_jobs, set_fields, transition
from flywheel.trainer.recipes import build_spec

QUESTIONS = ["I want a refund", "Where is my order", "Can you waive the fee", "Talk to a human"]
ANSWERS = [
    "Refunds take five business days.",
    "Your order ships on Tuesday.",
    "The fee cannot be waived.",
    "I have escalated your request.",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Not the session's tiny_model_dir: its vocabulary covers this module's QUESTIONS and ANSWERS (the SFT rows
    # the jobs train on) on top of the built-in corpus, and the losses these tests train towards are this model's.
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "base", tiny_corpus() + QUESTIONS + ANSWERS, vocab_size=300, hidden=32, layers=1
    )


def write_sft(folder: Path, n_train: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "messages": [{"role": "user", "content": QUESTIONS[i % 4]}, {"role": "assistant", "content": ANSWERS[i % 4]}],
            "weight": 1.0 + (i % 4 == 2),
        }
        for i in range(n_train)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (folder / "manifest.json").write_text(json.dumps({"id": "ds-1", "kind": "sft"}))
    return folder


def hyper(**overrides) -> TrainSettings:
    values = dict(
        epochs=2.0, batch_size=4, learning_rate=1e-2, lora_r=4, early_stopping_patience=0, warmup_ratio=0.0, min_steps=0
    )  # min_steps 0: exact step counts
    return TrainSettings(**{**values, **overrides})


def configure(project: Path) -> TrainSettings:
    """Write the test's [train] section to the project's flywheel.toml, so the CLI plans the same spec."""
    lines = ["[train]"] + [f"{k} = {json.dumps(v)}" for k, v in hyper().model_dump(exclude={"base_model", "target_modules"}).items()]
    (project / "flywheel.toml").write_text("\n".join(lines) + "\n")
    return load_settings(project).train


def _wait_for(predicate, timeout: float = 120.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_same_spec_launched_twice_starts_one_process_then_cancel_and_restart(
    ctx: Context, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = str(ctx.settings.project_dir)
    data = write_sft(tmp_path / "data")
    spec = build_spec(configure(ctx.settings.project_dir), data, base_model=base)
    # the spec carries the settings with "auto" resolved by the sizing rules (the tiny base's edges are small)
    expected = hyper().model_copy(update={"base_model": str(base), "method": "sft", "modules_to_save": ["embed_tokens", "lm_head"]})
    assert spec.hyper.model_dump() == expected.model_dump()
    first = launcher.launch(ctx, spec)
    second = launcher.launch(ctx, spec)
    other = Context(settings=ctx.settings)  # another CLI process: its own launcher, the same store
    third = launcher.launch(other, spec)
    other.close()
    assert first.id == second.id == third.id == spec.job_id()
    assert first.pid is not None and second.pid == third.pid == first.pid
    assert len(ctx.launcher._children) == 1 and not other.launcher._children
    assert Path(first.log_path).read_text().count("=== ") == 1  # one worker started

    # cancelled while it loads the training stack; `train` then points at resume, `--restart` starts over
    _wait_for(lambda: get_job(ctx.store, first.id).status == JobStatus.RUNNING)
    assert main(["-C", project, "jobs", "cancel", first.id, "--json"]) == 0
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["status"] == "killed" and cancelled["error"].startswith("cancelled")
    assert launcher.status(ctx, first.id).status == JobStatus.KILLED
    pid = cancelled["pid"]
    _wait_for(lambda: not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z")
    argv = ["-C", project, "train", "--dataset", str(data), "--base", str(base)]
    assert main(argv) == JobFailed.exit_code
    assert f"flywheel jobs resume {first.id}" in capsys.readouterr().err

    seen: list[str] = []
    assert main([*argv, "--restart", "--json"]) == 0  # restarts and waits, with a progress bar on stderr
    done = json.loads(capsys.readouterr().out)
    assert done["id"] == first.id and done["status"] == "succeeded" and done["attempts"] == 2
    assert done["progress"]["step"] == done["progress"]["total"] == 8 and done["result"]["resumed_from"] is None
    weights = Path(done["result"]["adapter_path"]) / ADAPTER_WEIGHTS
    assert done["result"]["adapter_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert Path(done["result"]["curve_path"]).is_file() and Path(done["result"]["lineage_path"]).is_file()
    assert launcher.launch(ctx, spec).status == JobStatus.SUCCEEDED  # asking again is a no-op
    record = launcher.wait(ctx, first.id, on_progress=lambda r: seen.append(str(r.status)))
    assert seen == ["succeeded"] and record.result == done["result"]

    assert main(["-C", project, "jobs", "list", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [first.id]
    assert main(["-C", project, "jobs", "show", first.id]) == 0
    shown = capsys.readouterr().out
    assert "succeeded" in shown and done["result"]["adapter_sha256"] in shown
    assert main(["-C", project, "jobs", "logs", first.id, "--tail", "3"]) == 0
    assert "succeeded" in capsys.readouterr().out
    assert main(["-C", project, "jobs", "show", "nope"]) == NotFoundError.exit_code
    assert main(["-C", project, "train", "--dataset", "no-such-id", "--base", str(base)]) == NotFoundError.exit_code


@pytest.mark.slow
def test_sigkilled_worker_is_detected_and_resumed_to_success(ctx: Context, base: Path, tmp_path: Path) -> None:
    # checkpoints every 2 steps; enough steps that the kill lands mid-run
    spec = build_spec(hyper(epochs=10.0, eval_steps=2), write_sft(tmp_path / "data"), base_model=base)
    job = launcher.launch(ctx, spec)
    running = _wait_for(lambda: (r := get_job(ctx.store, job.id)).progress and r.progress.get("checkpoint", 0) >= 4 and r)
    assert running.status == JobStatus.RUNNING and running.heartbeat_at is not None
    assert launcher._worker_alive(running.pid, running.work_dir)  # what a launcher without the child checks
    assert not launcher._worker_alive(os.getpid(), running.work_dir)  # a live pid that is not this worker
    os.killpg(running.pid, signal.SIGKILL)
    _wait_for(lambda: not launcher._worker_alive(running.pid, running.work_dir))  # a zombie counts as dead

    killed = _wait_for(lambda: (r := launcher.status(ctx, job.id)).ended and r)
    assert killed.status == JobStatus.KILLED and "signal 9" in killed.error and killed.log_path in killed.error
    with pytest.raises(JobFailed, match="resume with `flywheel jobs resume"):
        launcher.wait(ctx, job.id)
    assert launcher.launch(ctx, spec).status == JobStatus.KILLED  # launching again does not silently restart

    resumed = launcher.resume(ctx, job.id)
    assert resumed.attempts == 2 and resumed.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    done = launcher.wait(ctx, job.id, poll_s=0.2)
    assert done.status == JobStatus.SUCCEEDED and done.progress["step"] == done.progress["total"] == 40
    checkpoint = Path(done.result["resumed_from"]).name
    assert int(checkpoint.split("-")[1]) >= 4
    assert f"resuming from {done.result['resumed_from']}" in Path(done.log_path).read_text()
    assert launcher.resume(ctx, job.id).attempts == 2  # a succeeded job is not resumed again


@pytest.mark.slow
def test_failing_job_reports_the_log_tail(ctx: Context, base: Path, tmp_path: Path) -> None:
    data = write_sft(tmp_path / "data")
    spec = build_spec(hyper(), data, base_model=base)
    shutil.rmtree(data)  # the snapshot disappears between planning and training
    job = launcher.launch(ctx, spec)
    with pytest.raises(JobFailed) as caught:
        launcher.wait(ctx, job.id, poll_s=0.2)
    message = str(caught.value)
    assert f"job {job.id} failed" in message and "does not exist" in message
    assert f"--- last lines of {job.log_path} ---" in message and "ERROR flywheel.worker" in message
    record = get_job(ctx.store, job.id)
    assert record.status == JobStatus.FAILED and job.log_path in record.error
    # through the CLI: the same failure, exit status 6
    assert main(["-C", str(ctx.settings.project_dir), "jobs", "resume", job.id, "--restart"]) == JobFailed.exit_code
    assert get_job(ctx.store, job.id).attempts == 2


def test_job_records_and_guarded_transitions(any_store: Store) -> None:
    record = JobRecord(
        id="sft-abc",
        kind="train_sft",
        status=JobStatus.QUEUED,
        spec={"method": "sft"},
        work_dir="/tmp/j",
        log_path="/tmp/j/train.log",
        attempts=1,
        created_at=utcnow(),
    )
    assert insert_job(any_store, record) is True
    assert insert_job(any_store, record) is False  # the id is the idempotency key
    assert find_job(any_store, "missing") is None
    with pytest.raises(NotFoundError):
        get_job(any_store, "missing")

    assert transition(any_store, "sft-abc", [JobStatus.QUEUED], JobStatus.RUNNING, pid=42, started_at=utcnow())
    assert not transition(any_store, "sft-abc", [JobStatus.QUEUED], JobStatus.RUNNING, pid=43)  # lost the race
    assert set_fields(any_store, "sft-abc", only_status=[JobStatus.RUNNING], worker_pid=42, progress={"step": 3, "total": 10})
    assert not set_fields(any_store, "sft-abc", only_status=[JobStatus.RUNNING], worker_pid=7, progress={"step": 9})
    got = get_job(any_store, "sft-abc")
    assert got.status == JobStatus.RUNNING and got.pid == 42 and got.progress == {"step": 3, "total": 10}
    assert got.created_at.tzinfo is not None and utcnow() - got.created_at < timedelta(minutes=5)

    assert transition(
        any_store, "sft-abc", [JobStatus.RUNNING], JobStatus.SUCCEEDED, result={"adapter_sha256": "f" * 64}, finished_at=utcnow()
    )
    assert not set_fields(any_store, "sft-abc", only_status=[JobStatus.RUNNING], progress={"step": 10})  # ended: frozen
    insert_job(any_store, record.model_copy(update={"id": "dpo-def", "kind": "train_dpo"}))
    assert {r.id for r in list_jobs(any_store)} == {"sft-abc", "dpo-def"}
    assert [r.id for r in list_jobs(any_store, statuses=["succeeded"])] == ["sft-abc"]
    assert get_job(any_store, "sft-abc").result == {"adapter_sha256": "f" * 64}


def test_dataset_ids_resolve_through_the_store(ctx: Context, tmp_path: Path) -> None:
    from sqlalchemy import insert

    from flywheel.store.schema import datasets

    folder = write_sft(tmp_path / "snap")
    with ctx.store.begin() as conn:
        conn.execute(
            insert(datasets).values(id="ds-sft-1", kind="sft", path=str(folder), content_hash="x", manifest={}, created_at=utcnow())
        )
    assert launcher.resolve_dataset(ctx, "ds-sft-1") == folder
    assert launcher.resolve_dataset(ctx, str(folder)) == folder.resolve()
    with pytest.raises(NotFoundError, match="neither a folder nor a dataset id"):
        launcher.resolve_dataset(ctx, "ds-nope")


@pytest.mark.slow
def test_init_base_then_train_registers_v1_champion_and_v2_candidate(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    project = tmp_path / "proj"
    # a bad base folder: one line, exit 2, nothing written
    assert main(["-C", str(project), "init", "--base", str(tmp_path / "missing")]) == 2
    assert f"--base {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert main(["-C", str(project), "init", "--base", str(tmp_path)]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err and not (project / "flywheel.toml").exists()

    assert main(["-C", str(project), "init", "--base", str(base)]) == 0
    assert f"registered {base} as v1, the champion" in capsys.readouterr().out
    text = (project / "flywheel.toml").read_text()
    assert "# Required by the promotion gate" in text and '# test_set = "eval/test_set.jsonl"' in text
    assert load_settings(project).train.base_model == str(base)
    # init again keeps the file and registers nothing new; another base would not match the kept file
    assert main(["-C", str(project), "init", "--base", str(base)]) == 0
    assert "the champion is already v1" in capsys.readouterr().out
    assert main(["-C", str(project), "init", "--base", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    (project / "flywheel.toml").write_text(
        text.replace(
            "[train]\n",
            "[train]\n"
            + "".join(
                f"{k} = {json.dumps(v)}\n" for k, v in hyper(min_steps=0).model_dump(exclude={"base_model", "target_modules"}).items()
            ),
            1,
        )
    )

    # --no-wait returns before the job ends; the worker registers the candidate as it finishes
    data = write_sft(tmp_path / "data")
    assert main(["-C", str(project), "train", "--dataset", str(data), "--no-wait", "--json"]) == 0
    started = json.loads(capsys.readouterr().out)
    assert started["version"] is None and started["status"] in ("queued", "running")
    ctx = Context(settings=load_settings(project))
    try:
        from flywheel.release import registry

        _wait_for(lambda: len(registry.list_versions(ctx.store)) == 2, timeout=300, every=0.5)
        v2 = registry.resolve(ctx.store, "v2")
        assert (v2.parent, v2.job_id, v2.dataset_id, v2.status) == ("v1", started["id"], "ds-1", "candidate")
    finally:
        ctx.close()

    # `flywheel train` again finds the succeeded job and its version: the same v2, nothing new
    assert main(["-C", str(project), "train", "--dataset", str(data)]) == 0
    assert "registered v2 (candidate); next: flywheel eval --candidate v2" in capsys.readouterr().out
    assert main(["-C", str(project), "jobs", "show", started["id"]]) == 0
    assert "next: flywheel eval --candidate v2" in capsys.readouterr().out
    assert main(["-C", str(project), "models", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"v1", "v2"} and rows["v1"]["aliases"] == ["champion"] and rows["v2"]["job_id"] == started["id"]
    assert main(["-C", str(project), "models"]) == 0
    assert "v2" in capsys.readouterr().out

    # the README's next step finds v2; with no fixed test set the gate fails and says how to fix it
    assert main(["-C", str(project), "eval", "--candidate", "v2"]) == 1
    out = capsys.readouterr().out
    assert "v2 (candidate) vs v1 (champion)" in out and "no fixed test set: set eval.test_set in flywheel.toml" in out


@pytest.mark.slow
def test_first_train_registers_the_base_as_v1_before_the_candidate(
    ctx: Context, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flywheel.release import registry

    project = str(ctx.settings.project_dir)
    (ctx.settings.project_dir / "flywheel.toml").write_text(
        "[train]\nepochs = 1.0\nbatch_size = 4\nmin_steps = 0\nearly_stopping_patience = 0\n"
    )
    assert main(["-C", project, "train", "--dataset", str(write_sft(tmp_path / "data", n_train=8)), "--base", str(base), "--json"]) == 0
    captured = capsys.readouterr()
    done = json.loads(captured.out)  # stdout stays one JSON document
    assert f"registered the base model {base} as v1, the champion" in captured.err
    assert done["status"] == "succeeded" and done["version"] == "v2"
    assert [(r.id, r.status) for r in registry.list_versions(ctx.store)] == [("v2", "candidate"), ("v1", "champion")]
