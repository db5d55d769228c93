"""A Hugging Face hub id as the base model: resolved offline from the local cache, or refused in one line.

The cache is a real Hugging Face cache layout in a temporary folder (blobs, snapshot symlinks, refs/main),
holding a tiny model from demo.tiny_model.build_tiny_model; `flywheel init` runs as a process of its own
so that HF_HUB_CACHE / HF_HOME are read the way huggingface_hub reads them, at start-up."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.demo.tiny_model import build_tiny_model, tiny_corpus
from flywheel.errors import UserInputError
from flywheel.inference.folders import hub_origin, resolve_base_model
from flywheel.inference.local_model import LocalModel
from flywheel.settings import load_settings

REPO = "acme/tiny-support"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base", tiny_corpus(), vocab_size=300, hidden=64)


def _cache(cache: Path, repo_id: str, model: Path, revision: str) -> Path:
    """`model` laid out in `cache` as huggingface_hub downloads it; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision, encoding="utf-8")
    return snapshot


def _init(project: Path, base: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return subprocess.run(
        [sys.executable, "-m", "flywheel", "-C", str(project), "init", "--base", base],
        env={**clean, "HF_HUB_OFFLINE": "1", "COLUMNS": "500", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_init_with_a_cached_hub_id_registers_its_snapshot_as_v1_and_it_loads(tiny: Path, tmp_path: Path) -> None:
    from flywheel.context import Context
    from flywheel.release import registry

    snapshot = _cache(tmp_path / "hub", REPO, tiny, REVISION)
    project = tmp_path / "proj"
    done = _init(project, REPO, HF_HUB_CACHE=str(tmp_path / "hub"))
    assert done.returncode == 0, done.stderr
    origin = f"(Hugging Face {REPO} at revision {REVISION})"
    assert f"registered {snapshot} {origin} as v1, the champion" in done.stdout
    # flywheel.toml and the registry hold the snapshot folder, which pins the revision; the notes name the id
    assert load_settings(project).train.base_model == str(snapshot)
    assert origin in (project / "flywheel.toml").read_text(encoding="utf-8")
    ctx = Context(settings=load_settings(project))
    try:
        v1 = registry.resolve(ctx.store, registry.CHAMPION)
    finally:
        ctx.close()
    assert (v1.id, v1.base_model) == ("v1", str(snapshot)) and origin in v1.notes
    assert hub_origin(v1.base_model) == (REPO, REVISION)
    ask = [[{"role": "user", "content": "I want a refund"}]]
    [answer] = LocalModel(v1.base_model).generate(ask, max_new_tokens=6)
    assert answer == LocalModel(tiny).generate(ask, max_new_tokens=6)[0]  # the cached weights are the model's


def test_a_hub_id_not_in_the_cache_is_refused_in_one_line_saying_how_to_get_it(tiny: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    _cache(home / "hub", REPO, tiny, REVISION)  # another model is cached; this one is not
    project = tmp_path / "proj"
    done = _init(project, "acme/not-here", HF_HOME=str(home))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        (
            f"error: --base acme/not-here: neither a folder nor in the local Hugging Face cache ({home / 'hub'}); "
            "download it with `hf download acme/not-here` (older huggingface_hub: `huggingface-cli download acme/not-here`) "
            "and copy the cache here if this machine has no network, or pass a model folder"
        )
    ]
    assert not project.exists()  # refused before anything was written


def test_local_model_takes_a_hub_id_and_a_folder_wins_over_an_id(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    snapshot = _cache(tmp_path / "hub", REPO, tiny, REVISION)
    # huggingface_hub read HF_HUB_CACHE when this process imported it; in-process, its constant is the setting
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert LocalModel(REPO).base_path == snapshot  # what serve.base_model / --model with an id load
    from flywheel.commands.dataset import _production_model  # `flywheel select --model ORG/NAME`

    assert _production_model(None, REPO).base_path == snapshot
    with pytest.raises(UserInputError, match="neither a folder nor in the local Hugging Face cache"):
        _production_model(None, "acme/not-downloaded")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "tiny-support").symlink_to(tiny, target_is_directory=True)
    assert resolve_base_model(REPO) == Path(REPO)  # a folder of that name, here, is meant before the cache
    with pytest.raises(UserInputError, match=r"^/nowhere/model: no such folder$"):
        resolve_base_model("/nowhere/model")
    (tmp_path / "weights.txt").write_text("x", encoding="utf-8")
    with pytest.raises(UserInputError, match=r"^weights.txt: a file, not a model folder$"):
        resolve_base_model("weights.txt")
    assert hub_origin(tiny) is None
