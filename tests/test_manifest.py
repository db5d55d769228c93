"""`flywheel jobs manifest`: Kubernetes Jobs and KubeRay RayJobs for a training job, checked against the
kubernetes client's models. No Kubernetes cluster runs here, so only the rendering is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flywheel.cli import main
from flywheel.context import Context
from flywheel.records import utcnow
from flywheel.settings import load_settings
from flywheel.trainer.jobs import JobRecord, JobStatus, insert_job
from flywheel.trainer.manifest import check_rayjob, from_dict, k8s_name, kubernetes_job, ray_job, to_dict


def _job(ctx: Context, tmp_path: Path, attempts: int = 1) -> JobRecord:
    folder = ctx.settings.artifacts_path / "jobs" / "sft-0123abcd"
    record = JobRecord(
        id="sft-0123abcd",
        kind="train_sft",
        status=JobStatus.FAILED,
        spec={
            "method": "sft",
            "dataset_dir": str(ctx.settings.artifacts_path / "datasets" / "ds-1"),
            "base_model": str(tmp_path / "models/base"),
        },
        launcher="ray",
        work_dir=str(folder),
        log_path=str(folder / "train.log"),
        attempts=attempts,
        created_at=utcnow(),
    )
    insert_job(ctx.store, record)
    return record


def test_kubernetes_job_round_trips_through_the_models(project: Path, tmp_path: Path) -> None:
    ray = {"num_cpus": 2, "num_gpus": 1, "memory_mb": 4096, "storage": str(tmp_path / "shared"), "runtime_env": {"env_vars": {"X": "1"}}}
    ctx = Context(settings=load_settings(project, ray=ray))
    job = _job(ctx, tmp_path, attempts=3)
    doc = to_dict(kubernetes_job(ctx.settings, job, "registry.local/flywheel:1"))
    assert to_dict(from_dict(doc, "V1Job")) == doc  # what kubectl would send, read back by the client's models
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "Job"
    assert doc["metadata"]["name"] == "sft-0123abcd-r3" and doc["metadata"]["annotations"] == {"flywheel.dev/job": job.id}
    assert doc["spec"]["backoffLimit"] == 0  # flywheel resumes, Kubernetes does not retry
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.local/flywheel:1" and pod["restartPolicy"] == "Never"
    assert container["command"] == ["python", "-m", "flywheel.trainer.worker", job.work_dir]
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "4096Mi", "nvidia.com/gpu": "1"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["X"] == "1"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # the dataset lies inside the state folder (one volume); the base model and the storage outside it
    assert mounts == {
        "flywheel-state": str(ctx.settings.state_path),
        "flywheel-models": str(tmp_path / "models/base"),
        "flywheel-storage": str(tmp_path / "shared"),
    }
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == {name: name for name in mounts}
    ctx.close()


def test_rayjob_has_what_kuberay_needs(ctx: Context, tmp_path: Path) -> None:
    settings = ctx.settings.model_copy(
        update={"ray": ctx.settings.ray.model_copy(update={"entrypoint_prefix": "accelerate launch --num_processes 4", "num_gpus": 4})}
    )
    job = _job(ctx, tmp_path)
    doc = ray_job(settings, job, "img:2")
    spec = doc["spec"]
    assert spec["entrypoint"] == f"accelerate launch --num_processes 4 -m flywheel.trainer.worker {job.work_dir}"
    assert spec["jobId"] == job.id and spec["entrypointNumGpus"] == 4 and spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    assert head["spec"]["containers"][0]["image"] == "img:2" and "command" not in head["spec"]["containers"][0]
    assert to_dict(from_dict(head, "V1PodTemplateSpec")) == head
    broken = {**doc, "spec": {k: v for k, v in spec.items() if k != "entrypoint"}}
    with pytest.raises(ValueError, match="lacks entrypoint"):
        check_rayjob(broken)
    assert k8s_name("SFT_abc.DEF--") == "sft-abc-def" and len(k8s_name("x" * 100)) == 63


def test_jobs_manifest_command(ctx: Context, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = str(ctx.settings.project_dir)
    job = _job(ctx, tmp_path)
    assert main(["-C", project, "jobs", "manifest", job.id, "--image", "img:1"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["kind"] == "Job" and to_dict(from_dict(doc, "V1Job")) == doc

    out = tmp_path / "rayjob.json"
    assert main(["-C", project, "jobs", "manifest", job.id, "--kind", "rayjob", "--image", "img:1", "--json", "-o", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    check_rayjob(json.loads(out.read_text()))

    assert main(["-C", project, "jobs", "manifest", job.id]) == 2  # no image anywhere
    err = capsys.readouterr().err
    assert "no container image: pass --image or set ray.image" in err and len(err.strip().splitlines()) == 1
    assert main(["-C", project, "jobs", "manifest", job.id, "--kind", "pod", "--image", "i"]) == 2
    assert "--kind 'pod' is not one of: job, rayjob" in capsys.readouterr().err
    assert main(["-C", project, "jobs", "manifest", "nope", "--image", "i"]) == 3
