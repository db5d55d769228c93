"""Kubernetes manifests for a training job: a batch/v1 Job, or a KubeRay RayJob (`flywheel jobs manifest JOB`).

Both run the worker a local or Ray job runs (`python -m flywheel.trainer.worker JOB_DIR`, after
`[ray] entrypoint_prefix` when set) in `[ray] image`, with the resources of `[ray]` and the env_vars of
`[ray] runtime_env`. The folders the worker reads and writes are mounted at the same paths they have here,
each from a PersistentVolumeClaim named by its role, so the paths in the job's job.json stay valid:

    flywheel-state    the state folder (job folders, snapshots, artifacts; the SQLite store when used)
    flywheel-data     the dataset snapshot, when it lies outside the state folder
    flywheel-models   the base model's folder, when it lies outside the state folder
    flywheel-storage  `[ray] storage`, when it is a plain path

The Job is built from the `kubernetes` client's models, so it is typed as it is made; the RayJob is a
custom resource the client has no model for: its pod templates are models, and `check_rayjob` checks
the fields KubeRay requires. No Kubernetes cluster runs where flywheel is tested: only the rendering is
(tests/test_manifest.py); `kubectl apply -f` takes the output.

Kubernetes does not retry the worker (backoffLimit 0): a failed job is resumed through flywheel, which
knows the attempt and the checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, Literal

import yaml

from flywheel.errors import UserInputError
from flywheel.settings import Settings
from flywheel.trainer.jobs import WORKER_ENV, JobRecord
from flywheel.trainer.ray_launcher import submission_id

Kind = Literal["job", "rayjob"]
LABEL = "flywheel.dev/job-id"
RAYJOB_REQUIRED = ("entrypoint", "rayClusterSpec")


def k8s_name(text: str) -> str:
    """A DNS-1123 label: lowercase letters, digits and '-', at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    return name or "flywheel-job"


def worker_command(settings: Settings, job: JobRecord) -> list[str]:
    prefix = shlex.split(settings.ray.entrypoint_prefix) if settings.ray.entrypoint_prefix else [settings.ray.python or "python"]
    return [*prefix, "-m", "flywheel.trainer.worker", job.work_dir]


def _quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def _resources(settings: Settings) -> Any:
    from kubernetes.client import V1ResourceRequirements

    ray = settings.ray
    requests = {"cpu": _quantity(ray.num_cpus or 1)}
    if ray.memory_mb:
        requests["memory"] = f"{ray.memory_mb}Mi"
    limits = dict(requests)
    if ray.num_gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(math.ceil(ray.num_gpus))  # whole GPUs only
    return V1ResourceRequirements(requests=requests, limits=limits)


def _mounts(settings: Settings, job: JobRecord) -> list[tuple[str, str]]:
    """(claim, path) for each folder the worker needs, the state folder first; folders inside it share its volume."""
    state = settings.state_path
    wanted = [("flywheel-state", str(state))]
    candidates = [("flywheel-data", job.spec.get("dataset_dir")), ("flywheel-models", job.spec.get("base_model"))]
    storage = settings.ray.storage
    if storage and ("://" not in storage or storage.startswith("file://")):
        candidates.append(("flywheel-storage", storage.removeprefix("file://")))
    for claim, folder in candidates:
        if folder and not Path(folder).is_relative_to(state):
            wanted.append((claim, str(Path(folder))))
    return wanted


def pod_template(settings: Settings, job: JobRecord, image: str, container: str = "worker", command: bool = True) -> Any:
    """The pod that runs the worker (or, for a RayJob, a Ray node: `command` False) with its volumes."""
    from kubernetes import client as k8s

    mounts = _mounts(settings, job)
    env = {**WORKER_ENV, **dict(settings.ray.runtime_env.get("env_vars") or {})}
    spec = k8s.V1Container(
        name=container,
        image=image,
        command=worker_command(settings, job) if command else None,
        env=[k8s.V1EnvVar(name=key, value=str(value)) for key, value in env.items()],
        resources=_resources(settings),
        volume_mounts=[k8s.V1VolumeMount(name=claim, mount_path=path) for claim, path in mounts],
    )
    volumes = [
        k8s.V1Volume(name=claim, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=claim)) for claim, _ in mounts
    ]
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels={LABEL: k8s_name(job.id)}),
        spec=k8s.V1PodSpec(restart_policy="Never", containers=[spec], volumes=volumes),
    )


def kubernetes_job(settings: Settings, job: JobRecord, image: str) -> Any:
    """A batch/v1 Job running this job's current attempt."""
    from kubernetes import client as k8s

    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(
            name=k8s_name(submission_id(job)), labels={LABEL: k8s_name(job.id)}, annotations={"flywheel.dev/job": job.id}
        ),
        spec=k8s.V1JobSpec(backoff_limit=0, ttl_seconds_after_finished=7 * 24 * 3600, template=pod_template(settings, job, image)),
    )


def ray_job(settings: Settings, job: JobRecord, image: str) -> dict[str, Any]:
    """A KubeRay RayJob: a Ray cluster of one head and one worker node in `image`, the worker submitted to it
    under the same submission id the Ray launcher uses, the cluster deleted when the job ends."""
    ray = settings.ray
    runtime_env = dict(ray.runtime_env)
    runtime_env["env_vars"] = {**WORKER_ENV, **dict(runtime_env.get("env_vars") or {})}
    head = to_dict(pod_template(settings, job, image, container="ray-head", command=False))
    node = to_dict(pod_template(settings, job, image, container="ray-worker", command=False))
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(worker_command(settings, job)),
        "jobId": submission_id(job),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "entrypointNumCpus": ray.num_cpus,
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"}, "template": head},
            "workerGroupSpecs": [
                {"groupName": "workers", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "rayStartParams": {}, "template": node}
            ],
        },
    }
    if ray.num_gpus:
        spec["entrypointNumGpus"] = ray.num_gpus
    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": k8s_name(submission_id(job)),
            "labels": {LABEL: k8s_name(job.id)},
            "annotations": {"flywheel.dev/job": job.id},
        },
        "spec": spec,
    }
    check_rayjob(doc)
    return doc


def check_rayjob(doc: dict[str, Any]) -> None:
    """The fields KubeRay needs, and pod templates the kubernetes models accept; a ValueError names what is wrong."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob" or not (doc.get("metadata") or {}).get("name"):
        raise ValueError("a RayJob needs apiVersion ray.io/v1, kind RayJob and metadata.name")
    spec = doc.get("spec") or {}
    missing = [key for key in RAYJOB_REQUIRED if not spec.get(key)]
    if missing:
        raise ValueError(f"the RayJob's spec lacks {', '.join(missing)}")
    cluster = spec["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster.get("workerGroupSpecs", []))]
    for template in templates:
        if to_dict(from_dict(template, "V1PodTemplateSpec")) != template:
            raise ValueError("a pod template of the RayJob does not round-trip through the kubernetes models")


def to_dict(model: Any) -> Any:
    from kubernetes.client import ApiClient

    with ApiClient() as api:
        return api.sanitize_for_serialization(model)


def from_dict(doc: Any, klass: str) -> Any:
    """The kubernetes model `klass` (e.g. "V1Job") read from a plain manifest, as the client reads a server's answer."""
    from kubernetes.client import ApiClient

    with ApiClient() as api:
        return api.deserialize(json.dumps(doc), klass, "application/json")


def render(settings: Settings, job: JobRecord, kind: Kind = "job", image: str = "", fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The manifest of `kind` for `job` as YAML or JSON text."""
    image = image or settings.ray.image
    if not image:
        raise UserInputError("no container image: pass --image or set ray.image (an image with flywheel and its training stack installed)")
    doc = ray_job(settings, job, image) if kind == "rayjob" else to_dict(kubernetes_job(settings, job, image))
    return json.dumps(doc, indent=1) + "\n" if fmt == "json" else yaml.safe_dump(doc, sort_keys=False)
