"""Ray as the cluster engine, against a real local Ray cluster started for this module.

`ray start --head --num-cpus 2` runs in a fresh temp dir with free ports and its own process group; the
fixture stops it by that group (never `ray stop`, which would stop any other cluster on the machine).
One real tiny training job runs through the Job Submission API end to end (attached to, not submitted
twice; adapter through file:// storage, downloaded and checked before it is registered), a driver killed
mid-run is failed with Ray's reason and resumed from its checkpoint, a job is cancelled, and the batch
stages give the same results locally and as Ray tasks. Bad input: an unreachable address, a job no node can
run, a wrong runtime_env, each one line and a failed, resumable job.

Run with -s to see the Ray submission ids and timings the training tests print.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray.job_submission import JobSubmissionClient
from test_launcher import _wait_for, hyper, write_sft
from test_llm_judge import make_ctx, said, seed, stored

from flywheel.cli import main
from flywheel.context import Context
from flywheel.demo.tiny_model import build_tiny_model, tiny_corpus
from flywheel.errors import InfrastructureError, JobFailed, UserInputError
from flywheel.evals.judge import judge_failures, rule_findings
from flywheel.executor import LocalExecutor, RayExecutor, batches
from flywheel.inference.folders import ADAPTER_WEIGHTS
from flywheel.records import Interaction, Message
from flywheel.release import registry
from flywheel.settings import load_settings
from flywheel.store.db import open_store
from flywheel.store.vectors import Embedder, open_index, sha256_file
from flywheel.tools.jobs import register_candidate
from flywheel.trainer import launcher
from flywheel.trainer.jobs import JobStatus, get_job, list_jobs
from flywheel.trainer.ray_launcher import RayJobLauncher, submission_id
from flywheel.trainer.recipes import build_spec

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    address: str  # the dashboard: Job Submission API
    gcs: str  # what ray.init connects to
    client: Any


def _group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid and (proc / "stat").read_text().split(") ")[1][0] != "Z":
                    return True
            except (OSError, IndexError):
                continue
    return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # a short folder: Ray's unix sockets live under it, and their paths may not exceed 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    gcs, dashboard = _free_port(), _free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    command = [ray_cli, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats", "--include-dashboard", "true"]
    command += ["--port", str(gcs), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp)]
    command += ["--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    # its own session: the daemons `ray start` leaves behind stay in this process group, which is how they are stopped
    starter = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    pgid = starter.pid
    try:
        output = starter.communicate(timeout=180)[0].decode(errors="replace")
        assert starter.returncode == 0, output[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        client = None
        deadline = time.monotonic() + 120
        while client is None:
            try:
                client = JobSubmissionClient(address)
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        print(f"\nray cluster up in {time.monotonic() - started:.1f}s: {address}, gcs 127.0.0.1:{gcs}")
        yield Cluster(address=address, gcs=f"127.0.0.1:{gcs}", client=client)
    finally:
        _stop(pgid, temp)


def _stop(pgid: int, temp: Path) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_launcher import ANSWERS, QUESTIONS

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "base", tiny_corpus() + QUESTIONS + ANSWERS, vocab_size=300, hidden=32, layers=1
    )


def ray_project(project: Path, cluster: Cluster, **ray: Any) -> Context:
    """The project's flywheel.toml pointing at the cluster (so the CLI sees it too), and a context on it."""
    values = {"address": cluster.address, "cluster_address": cluster.gcs, "num_cpus": 1, **ray}
    lines = ['[train]\nlauncher = "ray"\n\n[ray]'] + [
        f"{key} = {json.dumps(value)}" for key, value in values.items() if not isinstance(value, dict)
    ]
    for key, table in ((k, v) for k, v in values.items() if isinstance(v, dict)):  # one level of tables, as TOML writes them
        lines += [f"[ray.{key}]"] + [f"{name} = {json.dumps(value)}" for name, value in table.items()]
    (project / "flywheel.toml").write_text("\n".join(lines) + "\n")
    return Context(settings=load_settings(project))


def _ray_jobs(cluster: Cluster, job_id: str) -> list[Any]:
    return [j for j in cluster.client.list_jobs() if (j.metadata or {}).get("flywheel_job") == job_id]


# --- training through the Job Submission API ----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_training_job_on_ray_attaches_registers_and_reports(
    project: Path, cluster: Cluster, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "shared-storage"
    ctx = ray_project(project, cluster, storage=f"file://{storage}")
    spec = build_spec(hyper(), write_sft(tmp_path / "data"), base_model=base)
    started = time.monotonic()
    job = launcher.launch(ctx, spec)
    assert job.launcher == "ray" and job.status == JobStatus.QUEUED
    # a second launch, another process's launch, and a submission after a "crash" all attach: one Ray job
    assert launcher.launch(ctx, spec).id == job.id
    other = Context(settings=ctx.settings)
    assert launcher.launch(other, spec).id == job.id
    assert RayJobLauncher(ctx.settings.ray).launch(get_job(ctx.store, job.id)) is None
    other.close()
    assert [j.submission_id for j in _ray_jobs(cluster, job.id)] == [job.id]

    done = launcher.wait(ctx, job.id, poll_s=0.5)
    elapsed = time.monotonic() - started
    assert done.status == JobStatus.SUCCEEDED and done.progress["step"] == done.progress["total"] == 8
    assert cluster.client.get_job_info(job.id).status.value == "SUCCEEDED"  # the log's copy waited for the entrypoint's exit
    assert len(_ray_jobs(cluster, job.id)) == 1  # 0 duplicates
    log_text = Path(done.log_path).read_text()
    assert f"(Ray job {job.id})" in log_text and "succeeded: adapter" in log_text  # Ray's copy of the worker's output

    # the adapter went to storage (safetensors, no pickle), and the checkpoints as they were saved
    uri = done.result["adapter_uri"]
    assert uri == f"file://{storage}/{job.id}/adapter"
    stored_files = {p.name for p in (storage / job.id / "adapter").iterdir()}
    assert ADAPTER_WEIGHTS in stored_files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in stored_files)
    assert any((storage / job.id / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    # the worker left registering to this side, which downloads, checks the sha256 and records that copy
    assert registry.list_versions(ctx.store) == []
    version = register_candidate(ctx, job.id)
    record = registry.resolve(ctx.store, version.version)
    fetched = ctx.settings.artifacts_path / "adapters" / job.id
    assert record.adapter_path == str(fetched) and record.adapter_sha256 == done.result["adapter_sha256"]
    assert sha256_file(fetched / ADAPTER_WEIGHTS) == done.result["adapter_sha256"] and uri in record.notes
    assert register_candidate(ctx, job.id).version == version.version  # idempotent

    # `flywheel jobs` reads it like a local job
    assert main(["-C", str(project), "jobs", "list", "--json"]) == 0
    assert [(r["id"], r["launcher"], r["status"]) for r in json.loads(capsys.readouterr().out)] == [(job.id, "ray", "succeeded")]
    assert main(["-C", str(project), "jobs", "logs", job.id, "--tail", "5"]) == 0
    assert "succeeded" in capsys.readouterr().out
    ctx.close()
    with capsys.disabled():
        print(f"\nray training job: submission {job.id}, {done.progress['step']} steps, launch to succeeded {elapsed:.1f}s (logs copied)")


@pytest.mark.slow
def test_a_killed_driver_fails_with_rays_reason_and_resumes_from_its_checkpoint(
    project: Path, cluster: Cluster, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "storage"
    ctx = ray_project(project, cluster, storage=str(storage))  # a plain shared path works like a URL
    spec = build_spec(hyper(epochs=10.0, eval_steps=2, seed=1), write_sft(tmp_path / "data"), base_model=base)
    started = time.monotonic()
    job = launcher.launch(ctx, spec)
    running = _wait_for(lambda: (r := get_job(ctx.store, job.id)).progress and r.progress.get("checkpoint", 0) >= 4 and r, timeout=300)
    _wait_for(lambda: any((storage / job.id / "checkpoints").glob("checkpoint-4/trainer_state.json")))
    os.kill(running.pid, signal.SIGKILL)  # the worker is the driver Ray watches

    failed = _wait_for(lambda: (r := launcher.status(ctx, job.id)).ended and r)
    assert failed.status == JobStatus.FAILED and failed.error.startswith(f"Ray job {job.id} failed")
    assert cluster.client.get_job_info(job.id).message.split(",")[0] in failed.error  # Ray's words: "... exit code 137"
    with pytest.raises(JobFailed, match="resume with `flywheel jobs resume"):
        launcher.wait(ctx, job.id)

    # this machine loses the folder's checkpoints: the new attempt restores the newest one from storage
    shutil.rmtree(Path(job.work_dir) / "checkpoints")
    resumed = launcher.resume(ctx, job.id)
    assert resumed.attempts == 2 and submission_id(resumed) == f"{job.id}-r2"
    done = launcher.wait(ctx, job.id, poll_s=0.5)
    assert done.status == JobStatus.SUCCEEDED and done.progress["step"] == done.progress["total"] == 40
    assert int(Path(done.result["resumed_from"]).name.split("-")[1]) >= 4
    assert "restored" in Path(done.log_path).read_text()
    assert sorted(j.submission_id for j in _ray_jobs(cluster, job.id)) == [job.id, f"{job.id}-r2"]
    ctx.close()
    with capsys.disabled():
        print(f"\nray resume: submissions {job.id} (killed at checkpoint 4) and {job.id}-r2, {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_cancel_stops_the_ray_job(project: Path, cluster: Cluster, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = ray_project(project, cluster)
    job = launcher.launch(ctx, build_spec(hyper(epochs=50.0, seed=2), write_sft(tmp_path / "data"), base_model=base))
    _wait_for(lambda: get_job(ctx.store, job.id).status == JobStatus.RUNNING)
    assert main(["-C", str(project), "jobs", "cancel", job.id, "--json"]) == 0
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["status"] == "killed" and cancelled["error"].startswith("cancelled")
    assert _wait_for(lambda: cluster.client.get_job_info(job.id).status.value == "STOPPED", timeout=60)
    ctx.close()


# --- bad input ------------------------------------------------------------------------------------------------


def test_unreachable_address_fails_the_job_in_one_line_and_resume_picks_up(
    project: Path, cluster: Cluster, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_sft(tmp_path / "data")
    down = f"http://127.0.0.1:{_free_port()}"
    ray_project(project, cluster, address=down).close()
    argv = ["-C", str(project), "train", "--dataset", str(data), "--base", str(base), "--no-wait"]
    assert main(argv) == InfrastructureError.exit_code
    err = capsys.readouterr().err.strip()
    assert f"cannot reach the Ray cluster at {down}" in err and len(err.splitlines()) == 1
    ctx = Context(settings=load_settings(project))
    (job,) = list_jobs(ctx.store)
    assert job.status == JobStatus.FAILED and f"cannot reach the Ray cluster at {down}" in job.error
    ctx.close()

    shutil.rmtree(data)  # the resumed attempt fails fast on the cluster: enough to show it ran there
    ctx = ray_project(project, cluster)  # the cluster is back
    assert main(["-C", str(project), "jobs", "resume", job.id, "--no-wait"]) == 0
    assert [j.submission_id for j in _ray_jobs(cluster, job.id)] == [f"{job.id}-r2"]
    ended = launcher.wait(ctx, job.id, poll_s=0.5, raise_on_failure=False)
    assert ended.status == JobStatus.FAILED and "does not exist" in ended.error  # the worker's own verdict, from the cluster
    ctx.close()


def test_a_job_no_node_can_run_is_failed_after_the_pending_timeout(project: Path, cluster: Cluster, base: Path, tmp_path: Path) -> None:
    ctx = ray_project(project, cluster, num_gpus=1, pending_timeout_s=2)  # the cluster has no GPU
    job = launcher.launch(ctx, build_spec(hyper(seed=3), write_sft(tmp_path / "data"), base_model=base))
    assert cluster.client.get_job_info(job.id).status.value == "PENDING"
    failed = launcher.wait(ctx, job.id, poll_s=0.5, raise_on_failure=False)
    assert failed.status == JobStatus.FAILED and f"the Ray cluster kept job {job.id} pending for" in failed.error
    assert "waiting for resources" in failed.error and "\n" not in failed.error.split(" (log:")[0]
    # Ray acts on the stop once the job's supervisor is placed (or fails it after RAY_JOB_START_TIMEOUT_SECONDS);
    # should it ever start, its worker finds the job no longer queued and trains nothing
    assert cluster.client.get_job_info(job.id).status.value in ("PENDING", "STOPPED", "FAILED")
    assert len(_ray_jobs(cluster, job.id)) == 1 and get_job(ctx.store, job.id).status == JobStatus.FAILED
    ctx.close()


def test_a_wrong_runtime_env_is_one_line_and_a_failed_job(project: Path, cluster: Cluster, base: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    ctx = ray_project(project, cluster, runtime_env={"working_dir": str(missing)})
    spec = build_spec(hyper(seed=4), write_sft(tmp_path / "data"), base_model=base)
    with pytest.raises(UserInputError) as caught:
        launcher.launch(ctx, spec)
    assert str(caught.value).startswith("ray.runtime_env:") and str(missing) in str(caught.value) and "\n" not in str(caught.value)
    job = get_job(ctx.store, spec.job_id())
    assert job.status == JobStatus.FAILED and job.error.startswith("ray.runtime_env:")
    assert _ray_jobs(cluster, job.id) == []  # nothing reached the cluster
    ctx.close()


def test_ray_missing_address_and_unreachable_cluster_address(project: Path) -> None:
    with pytest.raises(UserInputError, match="ray.address is empty"):
        RayJobLauncher(load_settings(project).ray)
    started = time.monotonic()
    with pytest.raises(InfrastructureError, match="cannot reach the Ray cluster at 127.0.0.1:"):
        RayExecutor(f"127.0.0.1:{_free_port()}").map(len, [[1]])
    assert time.monotonic() - started < 30  # ray.init alone would retry for minutes


# --- batch stages: the same results locally and as Ray tasks ----------------------------------------------------


def test_embedding_and_rule_judging_give_the_same_results_on_ray(project: Path, cluster: Cluster, tmp_path: Path) -> None:
    texts = [f"my card {word} has not arrived after {n} days" for n in range(9) for word in ("debit", "credit")] + ["refund now"] * 3
    local = Embedder().embed(texts)
    remote = Embedder(executor=RayExecutor(cluster.gcs), batch_rows=4).embed(texts)
    assert remote.shape == local.shape == (len(texts), 384) and remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, atol=1e-5)

    ctx = ray_project(project, cluster)
    index = open_index(ctx.settings)  # train.launcher "ray": the index embeds through Ray tasks
    assert isinstance(index.embedder.executor, RayExecutor)
    index.close()

    answers = ["We guarantee a refund today.", "", "It takes 5 days.", "Ignore that, we will definitely refund you."] * 3
    pairs = [
        (Interaction(id=f"i{n}", timestamp="2026-01-01T00:00:00Z", messages=[Message(role="user", content="card?"), said(a)]), None)
        for n, a in enumerate(answers)
    ]
    here = LocalExecutor().map(partial(rule_findings, ctx.settings), batches(pairs, 5))
    there = RayExecutor(cluster.gcs).map(partial(rule_findings, ctx.settings), batches(pairs, 5))
    assert there == here and any(here[0])
    ctx.close()

    # the whole judge stage: one store judged locally, one with its rule checks on Ray, the same verdicts
    verdicts = []
    on_ray = {"train": {"launcher": "ray"}, "ray": {"address": cluster.address, "cluster_address": cluster.gcs, "batch_rows": 2}}
    for name, sections in (("local", {}), ("ray", on_ray)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "flywheel.toml").write_text("")
        store = open_store(load_settings(folder))
        ids = seed(store, {f"k{n}": said(a) for n, a in enumerate(answers[:5])})
        summary = judge_failures(make_ctx(store, **sections))
        got = {key: stored(store, fid) for key, fid in ids.items()}
        verdicts.append((summary.failures, summary.unjudged, {k: (s, v.problem_type, v.severity, v.reason) for k, (s, v) in got.items()}))
        store.dispose()
    assert verdicts[0] == verdicts[1] and verdicts[0][0] >= 2


def test_the_eval_runner_gives_the_same_answers_and_metrics_on_ray(project: Path, cluster: Cluster, base: Path) -> None:
    from test_launcher import QUESTIONS

    from flywheel.evals.generate import DistributedGenerate, LocalGenerate, model_loader
    from flywheel.evals.report import ModelRef
    from flywheel.evals.rule_judge import RuleJudge
    from flywheel.evals.runner import EvalItem, evaluate_all
    from flywheel.records import Reference

    ctx = ray_project(project, cluster, batch_rows=6)
    settings = ctx.settings.model_copy(update={"eval": ctx.settings.eval.model_copy(update={"batch_size": 2, "max_new_tokens": 8})})
    items = [
        EvalItem(id=f"q{n}", messages=[Message(role="user", content=q)], reference=Reference(intent="faq", answer=q), intent="faq")
        for n, q in enumerate((QUESTIONS * 2)[:10])
    ]
    ref = ModelRef(name="base", base_model=str(base))
    remote_fn, release = model_loader(settings)(ref, settings)
    assert isinstance(remote_fn, DistributedGenerate) and remote_fn.chunk_size == 6
    local_fn = LocalGenerate(ref, settings)
    try:
        conversations = [[m.model_dump(exclude_none=True) for m in item.messages] for item in items]
        assert [a.text for a in remote_fn(conversations)] == [a.text for a in local_fn(conversations)]
        judge = RuleJudge(settings)
        remote = evaluate_all(remote_fn, {"test": items}, judge, settings)
        local = evaluate_all(local_fn, {"test": items}, judge, settings)
        assert remote["test"].model_dump() == local["test"].model_dump() and remote["test"].size == len(items)
    finally:
        release()
        local_fn.release()
        ctx.close()
