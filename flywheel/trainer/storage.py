"""Adapters and checkpoints on storage that both a Ray cluster and flywheel reach (`[ray] storage`).

The storage is a shared folder or an fsspec URL (file://, s3://, gs://, ... with the matching fsspec
package installed). Under it each job has a folder named by its id:

    <storage>/<job id>/adapter/                  the adapter as the recipe wrote it, pickles left out
    <storage>/<job id>/checkpoints/checkpoint-N/ the Trainer's checkpoints, uploaded as each is saved

The worker uploads (`push_checkpoint`, `publish_adapter`) and, starting on a machine with no checkpoint of
its own, downloads the newest one (`restore_checkpoint`). flywheel's side downloads the adapter into its
artifacts and checks the weights' sha256 against the job's result before the registry records it
(`fetch_adapter`). Completeness markers are uploaded last: `adapter.sha256` for an adapter and
`trainer_state.json` for a checkpoint, so a cut-short upload is never taken for a whole one.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from flywheel.errors import InfrastructureError
from flywheel.inference.folders import ADAPTER_WEIGHTS
from flywheel.store.vectors import sha256_file

log = logging.getLogger("flywheel.storage")

ADAPTER_MARKER = "adapter.sha256"
CHECKPOINT_MARKER = "trainer_state.json"
# Files that unpickle on load: an adapter in storage holds safetensors weights only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def job_url(storage: str, job_id: str) -> str:
    return f"{storage.rstrip('/')}/{job_id}"


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package (s3fs, gcsfs) missing
        raise InfrastructureError(f"storage {url}: {str(exc).splitlines()[0]}") from exc


def _failed(what: str, exc: BaseException) -> InfrastructureError:
    return InfrastructureError(f"storage: cannot {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _upload(folder: Path, url: str, marker: str, skip: tuple[str, ...] = ()) -> None:
    """Copy `folder`'s files under `url`, `marker` last."""
    fs, root = _fs(url)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(skip))
    files.sort(key=lambda p: p.name == marker)  # stable: the marker moves to the end
    try:
        for path in files:
            target = f"{root}/{path.relative_to(folder).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)
    except OSError as exc:
        raise _failed(f"upload {folder} to {url}", exc) from exc


def _download(url: str, folder: Path) -> None:
    fs, root = _fs(url)
    try:
        for remote in fs.find(root):
            target = folder / remote[len(root) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
    except OSError as exc:
        raise _failed(f"download {url}", exc) from exc


def publish_adapter(storage: str, job_id: str, adapter_dir: Path) -> str:
    """Upload the adapter folder (everything but pickles); returns its URL."""
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise InfrastructureError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} to publish")
    url = f"{job_url(storage, job_id)}/adapter"
    _upload(adapter_dir, url, ADAPTER_MARKER, skip=PICKLE_SUFFIXES)
    return url


def push_checkpoint(storage: str, job_id: str, checkpoint_dir: Path) -> str:
    """Upload one checkpoint folder (the Trainer's own files, optimizer state included); returns its URL."""
    url = f"{job_url(storage, job_id)}/checkpoints/{checkpoint_dir.name}"
    _upload(checkpoint_dir, url, CHECKPOINT_MARKER)
    return url


def restore_checkpoint(storage: str, job_id: str, checkpoints: Path) -> Path | None:
    """With no checkpoint in `checkpoints` (a new machine), download the newest complete one from storage.
    Returns the folder it wrote, None when there was nothing to do or nothing to fetch."""
    if any(checkpoints.glob(f"checkpoint-*/{CHECKPOINT_MARKER}")):
        return None
    fs, root = _fs(f"{job_url(storage, job_id)}/checkpoints")
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
        steps = sorted((int(n.split("-", 1)[1]), n) for n in names if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit())
        complete = [name for _, name in steps if fs.exists(f"{root}/{name}/{CHECKPOINT_MARKER}")]
    except OSError as exc:
        raise _failed(f"list the checkpoints under {root}", exc) from exc
    if not complete:
        return None
    target = checkpoints / complete[-1]
    _download(f"{job_url(storage, job_id)}/checkpoints/{complete[-1]}", target)
    log.info("restored %s from storage", target)
    return target


def fetch_adapter(url: str, dest: Path, sha256: str) -> Path:
    """Download the adapter at `url` into `dest` and check its weights against `sha256`; a folder already
    there with those weights is kept. Raises InfrastructureError (nothing kept) on a mismatch."""
    if (dest / ADAPTER_WEIGHTS).is_file() and sha256_file(dest / ADAPTER_WEIGHTS) == sha256:
        return dest
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    try:
        _download(url, partial)
        weights = partial / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise InfrastructureError(f"storage: {url} has no {ADAPTER_WEIGHTS}")
        pickles = [p.name for p in partial.rglob("*") if p.name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise InfrastructureError(f"storage: {url} holds pickled files ({', '.join(pickles[:3])}); only safetensors are loaded")
        found = sha256_file(weights)
        if found != sha256:
            raise InfrastructureError(f"storage: {url}/{ADAPTER_WEIGHTS} has sha256 {found[:12]}, the job recorded {sha256[:12]}")
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest
